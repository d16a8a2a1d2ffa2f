/* Drives the virtio-console at VIRTIO_MMIO_BASE from CPL 3: sends a greeting on the
   transmit queue, waits for "ping\n" on the receive queue and answers "got: ping\n".
   With parameter bit 0 it first abuses the device in the next window (an invalid
   queue size) and checks that device reports NEEDS_RESET, to show the console keeps
   serving. Exit 0 when everything behaved. */
#include "guest.h"
#include "virtio.h"

#define RXQ_MEM ((u64)GUEST_HEAP)
#define TXQ_MEM ((u64)GUEST_HEAP + 0x8000)
#define TX_BUF ((u64)GUEST_HEAP + 0x10000)
#define RX_BUF ((u64)GUEST_HEAP + 0x11000)

static struct virtq rx, tx;

static void send(const char *s)
{
    u32 n = 0;
    while (s[n])
        n++;
    memcpy((void *)TX_BUF, s, n);
    u16 old = tx.avail_idx;
    tx.desc[0] = (struct vq_desc){TX_BUF, n, 0, 0};
    virtq_push(&tx, 0);
    virtq_kick(&tx, old);
    virtq_wait(&tx, 0);
}

static int abuse_next_device(void)
{
    u64 other = VIRTIO_MMIO_BASE + 0x1000;
    u64 features;
    if (virtio_init(other, 2, 0, &features))
        return 40;
    vio_w(other, VIRTIO_QUEUE_SEL, 0);
    vio_w(other, VIRTIO_QUEUE_NUM, 3); /* not a power of two */
    vio_w(other, VIRTIO_QUEUE_READY, 1);
    if (vio_r(other, VIRTIO_QUEUE_READY) != 0)
        return 41;
    if (!(vio_r(other, VIRTIO_STATUS) & STATUS_NEEDS_RESET))
        return 42;
    return 0;
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    if (param & 1) {
        int e = abuse_next_device();
        if (e)
            return e;
    }
    u64 base = VIRTIO_MMIO_BASE, features;
    int err = virtio_init(base, 3, F_EVENT_IDX, &features);
    if (err)
        return 100 - err;
    int ev = !!(features & F_EVENT_IDX);
    if ((err = virtq_setup(&rx, base, 0, 16, RXQ_MEM, ev)) ||
        (err = virtq_setup(&tx, base, 1, 16, TXQ_MEM, ev)))
        return 100 - err;
    virtio_driver_ok(base);

    send("hello from virtio-console\n");

    char line[64];
    u32 got = 0;
    while (got < 5) {
        u16 old = rx.avail_idx;
        rx.desc[0] = (struct vq_desc){RX_BUF, 64, DESC_F_WRITE, 0};
        virtq_push(&rx, 0);
        virtq_kick(&rx, old);
        u32 len;
        virtq_wait(&rx, &len);
        if (len > 64 || got + len > sizeof line - 1)
            return 30;
        memcpy(line + got, (void *)RX_BUF, len);
        got += len;
    }
    line[got] = 0;
    if (memcmp(line, "ping\n", 5))
        return 31;
    send("got: ping\n");
    return 0;
}
