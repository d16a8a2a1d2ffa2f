/* Drives the virtio-net device at VIRTIO_MMIO_BASE from CPL 3. It sends one UDP
   datagram, "hello from a vmcraft guest", from 10.0.2.2:4000 (this NIC's MAC, read
   from the config space) to 10.0.2.1:5000 at MAC 02:00:00:00:00:01. Then it waits for
   a datagram from 10.0.2.1:5000 to port 4000 carrying "pong" and exits 0. Frames that
   do not match are ignored and their buffers reposted. */
#include "guest.h"
#include "virtio.h"

#define RXQ_MEM ((u64)GUEST_HEAP)
#define TXQ_MEM ((u64)GUEST_HEAP + 0x8000)
#define TX_BUF ((u64)GUEST_HEAP + 0x10000)
#define RX_BUFS ((u64)GUEST_HEAP + 0x20000)
#define RX_BUF_SIZE 2048
#define RX_COUNT 8
#define NET_HDR 12

static struct virtq rx, tx;
static const u8 host_mac[6] = {2, 0, 0, 0, 0, 1};
static const u8 guest_ip[4] = {10, 0, 2, 2};
static const u8 host_ip[4] = {10, 0, 2, 1};

static void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = v; }
static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }

static u16 ip_checksum(const u8 *h, int len)
{
    u32 sum = 0;
    for (int i = 0; i < len; i += 2)
        sum += get16(h + i);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static void post_rx(u16 slot)
{
    u16 old = rx.avail_idx;
    rx.desc[slot] = (struct vq_desc){RX_BUFS + RX_BUF_SIZE * (u64)slot, RX_BUF_SIZE, DESC_F_WRITE, 0};
    virtq_push(&rx, slot);
    virtq_kick(&rx, old);
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    (void)param;
    u64 base = VIRTIO_MMIO_BASE, features;
    int err = virtio_init(base, 1, F_EVENT_IDX | (1ul << 5) /* MAC */, &features);
    if (err)
        return 100 - err;
    if (!(features & (1ul << 5)))
        return 50;
    int ev = !!(features & F_EVENT_IDX);
    if ((err = virtq_setup(&rx, base, 0, 16, RXQ_MEM, ev)) ||
        (err = virtq_setup(&tx, base, 1, 16, TXQ_MEM, ev)))
        return 100 - err;
    virtio_driver_ok(base);
    u8 mac[8];
    *(u32 *)mac = vio_r(base, VIRTIO_CONFIG);
    *(u32 *)(mac + 4) = vio_r(base, VIRTIO_CONFIG + 4);
    for (u16 i = 0; i < RX_COUNT; i++)
        post_rx(i);

    /* One UDP datagram behind a zeroed virtio-net header. */
    static const char msg[] = "hello from a vmcraft guest";
    const int payload = sizeof msg - 1;
    u8 *f = (u8 *)TX_BUF;
    memset(f, 0, NET_HDR);
    u8 *eth = f + NET_HDR, *ip = eth + 14, *udp = ip + 20;
    memcpy(eth, host_mac, 6);
    memcpy(eth + 6, mac, 6);
    put16(eth + 12, 0x0800);
    memset(ip, 0, 20);
    ip[0] = 0x45;
    put16(ip + 2, 20 + 8 + payload);
    put16(ip + 6, 0x4000);
    ip[8] = 64;
    ip[9] = 17;
    memcpy(ip + 12, guest_ip, 4);
    memcpy(ip + 16, host_ip, 4);
    put16(ip + 10, ip_checksum(ip, 20));
    put16(udp, 4000);
    put16(udp + 2, 5000);
    put16(udp + 4, 8 + payload);
    put16(udp + 6, 0);
    memcpy(udp + 8, msg, payload);
    u16 old = tx.avail_idx;
    tx.desc[0] = (struct vq_desc){TX_BUF, NET_HDR + 14 + 20 + 8 + payload, 0, 0};
    virtq_push(&tx, 0);
    virtq_kick(&tx, old);
    virtq_wait(&tx, 0);

    for (;;) {
        u32 len;
        u16 slot = (u16)virtq_wait(&rx, &len);
        const u8 *r = (const u8 *)(RX_BUFS + RX_BUF_SIZE * (u64)slot) + NET_HDR;
        const u8 *rip = r + 14, *rudp = rip + 20;
        int match = len >= NET_HDR + 14 + 20 + 8 + 4 && get16(r + 12) == 0x0800 &&
                    rip[9] == 17 && !memcmp(rip + 12, host_ip, 4) &&
                    !memcmp(rip + 16, guest_ip, 4) && get16(rudp) == 5000 &&
                    get16(rudp + 2) == 4000 && !memcmp(rudp + 8, "pong", 4) &&
                    !memcmp(r, mac, 6);
        if (match)
            return 0;
        post_rx(slot);
    }
}
