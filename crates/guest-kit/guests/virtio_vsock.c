/* Drives the virtio-vsock device at VIRTIO_MMIO_BASE from CPL 3, as its own small
   driver (polling): connections both ways with credit kept on both sides.

   Parameter 0, the session (the host runs an echo listener at <uds>_1234, nobody at
   <uds>_4321, and connects to guest port 5000 once):
     1. 256 KiB to host port 1234 and back, the guest's window 16 KiB and its credit
        given back only when the window is used up (the host must stop there: any byte
        past the credit fails the run);
     2. a connection to host port 4321 gets RST;
     3. 32 connections to port 1234 at once, 1000 bytes each way on each, then a full
        shutdown each, answered by the host's RST;
     4. listening on port 5000: the host's connection accepted, 4096 bytes echoed
        until the host shuts it down;
   then prints "vsock ok" and exits 0, or exits with the failed step.

   Parameter 1, the reconnecting agent (for snapshots and restores): connects to host
   port 1234 and echoes an 8-byte counter through it forever; on a transport reset
   (the event queue) it drops its connection, reads its context id again and
   connects anew. A refused reconnect exits 70; a counter that comes back wrong
   exits 71. The count of reconnects is kept at GUEST_HEAP + 0x7f000. */
#include "guest.h"
#include "virtio.h"

#define HEAP ((u64)GUEST_HEAP)
#define RXQ (HEAP)
#define TXQ (HEAP + 0x3000)
#define EVQ (HEAP + 0x6000)
#define EVBUF (HEAP + 0x9000)
#define TXBUF (HEAP + 0x10000)
#define RXBUF (HEAP + 0x30000)
#define RECONNECTS ((volatile u64 *)(HEAP + 0x7f000))

#define RX_BUFS 32
#define RX_BUF_SIZE (44 + 4096)
#define EV_BUFS 4
#define MAX_CONNS 40
#define WINDOW (16 << 10)

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7

struct hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { FREE, CONNECTING, OPEN, REFUSED, CLOSED };

struct conn {
    int state;
    u32 local, peer;
    u32 peer_buf, peer_fwd; /* the host's credit */
    u32 tx_cnt;             /* bytes sent */
    u32 rx_cnt;             /* bytes received (and consumed) */
    u32 fwd_told;           /* the fwd_cnt last told the host */
    u32 expect;             /* next byte expected, as a stream offset */
    int host_shut;
    u8 salt;
};

static struct virtq rxq, txq, evq;
static struct conn conns[MAX_CONNS];
static u64 cid;
static u32 next_port = 40000;
static int transport_reset;

static void read_cid(void)
{
    cid = (u64)vio_r(VIRTIO_MMIO_BASE, VIRTIO_CONFIG) |
          (u64)vio_r(VIRTIO_MMIO_BASE, VIRTIO_CONFIG + 4) << 32;
}

static u8 pattern(u8 salt, u32 offset) { return (u8)(offset * 7 + salt); }

static void post_rx(u16 i)
{
    u16 old = rxq.avail_idx;
    rxq.desc[i] = (struct vq_desc){RXBUF + (u64)i * RX_BUF_SIZE, RX_BUF_SIZE, DESC_F_WRITE, 0};
    virtq_push(&rxq, i);
    virtq_kick(&rxq, old);
}

static void post_event(u16 i)
{
    u16 old = evq.avail_idx;
    evq.desc[i] = (struct vq_desc){EVBUF + 8 * (u64)i, 8, DESC_F_WRITE, 0};
    virtq_push(&evq, i);
    virtq_kick(&evq, old);
}

static void send(struct conn *c, u16 op, u32 flags, const u8 *data, u32 len)
{
    struct hdr *h = (struct hdr *)TXBUF;
    *h = (struct hdr){cid, 2, c->local, c->peer, len, 1, op, flags, WINDOW, c->rx_cnt};
    if (len)
        memcpy((void *)(TXBUF + 44), data, len);
    c->fwd_told = c->rx_cnt;
    u16 old = txq.avail_idx;
    txq.desc[0] = (struct vq_desc){TXBUF, 44 + len, 0, 0};
    virtq_push(&txq, 0);
    virtq_kick(&txq, old);
    virtq_wait(&txq, 0);
    if (op == OP_RW)
        c->tx_cnt += len;
}

static struct conn *find(u32 local, u32 peer)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].state != FREE && conns[i].local == local && conns[i].peer == peer)
            return &conns[i];
    return 0;
}

static struct conn *slot(void)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].state == FREE) {
            memset(&conns[i], 0, sizeof conns[i]);
            return &conns[i];
        }
    return 0;
}

static u32 fail; /* the first failed check: the run's exit code */
static u32 listen_port;
static int echo_back; /* step 4: echo what the host sends */

static void check(int ok, u32 code)
{
    if (!ok && !fail)
        fail = code;
}

static int agent_mode;
static u8 last_rx[8];

/* Take a transport reset, if one came. */
static void poll_events(void)
{
    while (virtq_has_used(&evq)) {
        u32 len;
        u32 id = virtq_wait(&evq, &len);
        if (len >= 4 && *(volatile u32 *)(EVBUF + 8 * (u64)id) == 0) {
            /* Transport reset: every connection is gone. */
            for (int i = 0; i < MAX_CONNS; i++)
                conns[i].state = FREE;
            read_cid();
            transport_reset = 1;
        }
        post_event((u16)id);
    }
}

/* Take one completed rx buffer, if any; returns whether there was one. */
static int poll_rx(void)
{
    int have = virtq_has_used(&rxq);
    /* The device posts a transport reset before anything that follows it: looked
       for after seeing the rx buffer, it is seen if it came first. */
    poll_events();
    if (!have)
        return 0;
    u32 len;
    u32 id = virtq_wait(&rxq, &len);
    struct hdr h = *(struct hdr *)(RXBUF + (u64)id * RX_BUF_SIZE);
    const u8 *data = (const u8 *)(RXBUF + (u64)id * RX_BUF_SIZE + 44);
    check(len >= 44 && h.len == len - 44, 10);
    check(h.src_cid == 2 && h.dst_cid == cid && h.type == 1, 11);
    struct conn *c = find(h.dst_port, h.src_port);
    if (!c && h.op == OP_REQUEST && h.dst_port == listen_port && listen_port) {
        c = slot();
        c->local = h.dst_port;
        c->peer = h.src_port;
        c->peer_buf = h.buf_alloc;
        c->peer_fwd = h.fwd_cnt;
        c->state = OPEN;
        c->salt = 0x55;
        send(c, OP_RESPONSE, 0, 0, 0);
    } else if (c) {
        c->peer_buf = h.buf_alloc;
        c->peer_fwd = h.fwd_cnt;
        switch (h.op) {
        case OP_RESPONSE:
            check(c->state == CONNECTING, 12);
            c->state = OPEN;
            break;
        case OP_RST:
            c->state = c->state == CONNECTING ? REFUSED : CLOSED;
            break;
        case OP_SHUTDOWN:
            c->host_shut = 1;
            if (echo_back) {
                send(c, OP_RST, 0, 0, 0);
                c->state = CLOSED;
            }
            break;
        case OP_RW:
            /* Never more than the credit this guest gave. */
            check(c->rx_cnt + h.len - c->fwd_told <= WINDOW, 13);
            for (u32 i = 0; i < h.len; i++) {
                if (agent_mode)
                    last_rx[(c->rx_cnt + i) % 8] = data[i];
                else
                    check(data[i] == pattern(c->salt, c->expect), 14);
                c->expect++;
            }
            c->rx_cnt += h.len;
            if (echo_back)
                send(c, OP_RW, 0, data, h.len);
            /* Credit back only once the window is used up. */
            if (c->rx_cnt - c->fwd_told == WINDOW)
                send(c, OP_CREDIT_UPDATE, 0, 0, 0);
            break;
        case OP_CREDIT_REQUEST:
            send(c, OP_CREDIT_UPDATE, 0, 0, 0);
            break;
        default:
            break;
        }
    }
    post_rx((u16)id);
    return 1;
}

static void pump(void)
{
    while (poll_rx())
        ;
}

static struct conn *connect(u32 port, u8 salt)
{
    struct conn *c = slot();
    c->local = next_port++;
    c->peer = port;
    c->state = CONNECTING;
    c->salt = salt;
    send(c, OP_REQUEST, 0, 0, 0);
    return c;
}

static void wait_state(struct conn *c)
{
    while (c->state == CONNECTING && !transport_reset)
        pump();
}

/* Send `n` bytes of the connection's pattern, within the host's credit. */
static void send_pattern(struct conn *c, u32 n)
{
    static u8 chunk[4096];
    while (n && c->state == OPEN && !transport_reset) {
        u32 credit = c->peer_buf - (c->tx_cnt - c->peer_fwd);
        u32 len = n < 4096 ? n : 4096;
        if (len > credit)
            len = credit;
        if (!len) {
            pump();
            continue;
        }
        for (u32 i = 0; i < len; i++)
            chunk[i] = pattern(c->salt, c->tx_cnt + i);
        send(c, OP_RW, 0, chunk, len);
        n -= len;
        pump();
    }
}

static int setup(void)
{
    u64 base = VIRTIO_MMIO_BASE, features;
    int err = virtio_init(base, 19, F_EVENT_IDX, &features);
    if (err)
        return 100 - err;
    int ev = !!(features & F_EVENT_IDX);
    if ((err = virtq_setup(&rxq, base, 0, 64, RXQ, ev)) ||
        (err = virtq_setup(&txq, base, 1, 64, TXQ, ev)) ||
        (err = virtq_setup(&evq, base, 2, 8, EVQ, ev)))
        return 100 - err;
    virtq_polled(&rxq);
    virtq_polled(&txq);
    virtq_polled(&evq);
    read_cid();
    virtio_driver_ok(base);
    for (u16 i = 0; i < RX_BUFS; i++)
        post_rx(i);
    for (u16 i = 0; i < EV_BUFS; i++)
        post_event(i);
    return 0;
}

static u32 session(void)
{
    /* 1: a stream both ways through credit exhaustion. */
    struct conn *c = connect(1234, 1);
    wait_state(c);
    if (c->state != OPEN)
        return 20;
    send_pattern(c, 256 << 10);
    while (c->rx_cnt < (256 << 10) && c->state == OPEN && !fail)
        pump();
    if (fail)
        return fail;
    if (c->rx_cnt != 256 << 10)
        return 21;
    send(c, OP_SHUTDOWN, 3, 0, 0);
    while (c->state == OPEN)
        pump();

    /* 2: nobody listens. */
    c = connect(4321, 2);
    wait_state(c);
    if (c->state != REFUSED)
        return 30;
    c->state = FREE;

    /* 3: many at once. */
    struct conn *many[32];
    for (int i = 0; i < 32; i++)
        many[i] = connect(1234, (u8)(3 + i));
    for (int i = 0; i < 32; i++) {
        wait_state(many[i]);
        if (many[i]->state != OPEN)
            return 40;
    }
    for (int i = 0; i < 32; i++)
        send_pattern(many[i], 1000);
    for (int i = 0; i < 32; i++) {
        while (many[i]->rx_cnt < 1000 && !fail)
            pump();
        send(many[i], OP_SHUTDOWN, 3, 0, 0);
    }
    for (int i = 0; i < 32; i++) {
        while (many[i]->state == OPEN)
            pump();
        if (many[i]->state != CLOSED || many[i]->rx_cnt != 1000)
            return 41;
        many[i]->state = FREE;
    }
    if (fail)
        return fail;

    /* 4: the host connects. */
    listen_port = 5000;
    echo_back = 1;
    puts_com1("listening\n");
    struct conn *in = 0;
    while (!in) {
        pump();
        for (int i = 0; i < MAX_CONNS; i++)
            if (conns[i].state != FREE && conns[i].local == 5000)
                in = &conns[i];
    }
    while (in->state == OPEN && !fail)
        pump();
    if (fail)
        return fail;
    if (in->rx_cnt != 4096 || in->tx_cnt != 4096)
        return 50;
    puts_com1("vsock ok\n");
    return 0;
}

/* Connects, echoes a counter, reconnects whenever the connection goes (a transport
   reset, or a reset of the connection itself). */
static u32 agent(void)
{
    u64 counter = 0;
    agent_mode = 1;
    *RECONNECTS = 0;
    for (;;) {
        transport_reset = 0;
        struct conn *c = connect(1234, 0);
        wait_state(c);
        if (transport_reset)
            continue; /* its slot was freed with the others */
        if (c->state != OPEN)
            return 70;
        (*RECONNECTS)++;
        while (!transport_reset && c->state == OPEN) {
            u8 msg[8];
            memcpy(msg, &counter, 8);
            u32 before = c->rx_cnt;
            /* The echo comes back as the same 8 bytes. */
            send(c, OP_RW, 0, msg, 8);
            while (c->rx_cnt - before < 8 && !transport_reset && c->state == OPEN)
                pump();
            if (transport_reset || c->state != OPEN)
                break;
            if (memcmp(last_rx, msg, 8))
                return 71;
            counter++;
        }
        if (!transport_reset)
            c->state = FREE;
    }
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    u32 err = setup();
    if (err)
        return err;
    return param == 1 ? agent() : session();
}
