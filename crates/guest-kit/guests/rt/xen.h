/* Paravirtual front ends for test guests: hypercalls through the vmcraft hypercall
   port (Xen's register convention), event-channel send, grant entries, the PV
   console ring and a blkif front ring (io/ring.h's protocol). */
#ifndef XEN_H
#define XEN_H
#include "guest.h"

static inline long hypercall(u64 nr, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5)
{
    register u64 r10 __asm__("r10") = a4;
    register u64 r8 __asm__("r8") = a5;
    long ret;
    __asm__ volatile("outb %%al, %[port]"
                     : "=a"(ret)
                     : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8),
                       [port] "i"(HYPERCALL_PORT)
                     : "memory");
    return ret;
}

#define HYPERVISOR_event_channel_op 32
#define EVTCHNOP_send 4

/* EVTCHNOP_send as a hypercall: the general path, one exit to the VMM. */
static inline long evtchn_send_hypercall(u32 port)
{
    static u32 arg;
    arg = port;
    return hypercall(HYPERVISOR_event_channel_op, EVTCHNOP_send, (u64)&arg, 0, 0, 0);
}

/* The fast path: the doorbell port, which the VMM binds to each backend's eventfd
   with an ioeventfd, so the send stays in the kernel. */
static inline void evtchn_send(u32 port)
{
    __asm__ volatile("outl %0, %1" ::"a"(port), "i"(PV_DOORBELL_PORT));
}

/* Grant table v1: domid and frame first, then flags. */
#define GTF_permit_access 1
#define GTF_readonly (1 << 2)
struct grant_entry {
    u16 flags;
    u16 domid;
    u32 frame;
};

static inline void grant_access(u32 ref, u64 page, int readonly)
{
    volatile struct grant_entry *g = (volatile struct grant_entry *)PV_GRANT_TABLE + ref;
    g->domid = 0;
    g->frame = (u32)(page >> 12);
    barrier();
    g->flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
}

/* The PV console page (xencons_interface). */
struct xencons {
    char in[1024];
    char out[2048];
    u32 in_cons, in_prod;
    u32 out_cons, out_prod;
};

/* Write `n` bytes to the PV console ring, notifying the backend once when the ring
   fills (then waiting for room) and once at the end. */
static inline void pv_console_write_n(const char *s, u64 n)
{
    volatile struct xencons *c = (volatile struct xencons *)PV_CONSOLE_PAGE;
    for (u64 i = 0; i < n; i++) {
        if (c->out_prod - READ_ONCE(c->out_cons) >= sizeof c->out) {
            evtchn_send(PV_CONSOLE_PORT); /* full: let the host drain it */
            while (c->out_prod - READ_ONCE(c->out_cons) >= sizeof c->out)
                __asm__ volatile("pause");
        }
        c->out[c->out_prod % sizeof c->out] = s[i];
        barrier();
        c->out_prod++;
    }
    evtchn_send(PV_CONSOLE_PORT);
}

static inline void pv_console_write(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    pv_console_write_n(s, n);
}

/* blkif (io/blkif.h) on a one-page front ring. */
#define BLKIF_OP_READ 0
#define BLKIF_OP_WRITE 1
#define BLKIF_OP_FLUSH_DISKCACHE 3
struct blkif_segment {
    u32 gref;
    u8 first_sect, last_sect;
    u16 pad;
};
struct blkif_request {
    u8 operation;
    u8 nr_segments;
    u16 handle;
    u32 pad;
    u64 id;
    u64 sector_number;
    struct blkif_segment seg[11];
};
struct blkif_response {
    u64 id;
    u8 operation;
    u8 pad;
    short status;
    u32 pad2;
};
#define BLK_RING_SIZE 32 /* (4096 - 64) / 112, rounded down to a power of two */

struct sring_header {
    u32 req_prod, req_event, rsp_prod, rsp_event;
};

struct blk_front {
    volatile struct sring_header *h;
    u32 req_prod_pvt, rsp_cons;
    u64 notifications;
};

static inline void blk_front_init(struct blk_front *f)
{
    f->h = (volatile struct sring_header *)PV_BLK_RING;
    memset((void *)PV_BLK_RING, 0, 4096);
    f->h->req_event = 1;
    f->h->rsp_event = 1;
    f->req_prod_pvt = 0;
    f->rsp_cons = 0;
    f->notifications = 0;
}

static inline struct blkif_request *blk_slot(struct blk_front *f, u32 idx)
{
    return (struct blkif_request *)((u64)PV_BLK_RING + 64 + 112 * (u64)(idx % BLK_RING_SIZE));
}

/* Publish queued requests; notify the backend only if it asked (ring.h). */
static inline void blk_push(struct blk_front *f)
{
    u32 old = f->h->req_prod, new = f->req_prod_pvt;
    barrier();
    f->h->req_prod = new;
    mb();
    if ((u32)(new - f->h->req_event) < (u32)(new - old)) {
        evtchn_send(PV_BLK_PORT);
        f->notifications++;
    }
}

/* Wait for the next response and return its status. */
static inline short blk_wait(struct blk_front *f)
{
    while (READ_ONCE(f->h->rsp_prod) == f->rsp_cons)
        __asm__ volatile("pause");
    barrier();
    volatile struct blkif_response *r =
        (volatile struct blkif_response *)((u64)PV_BLK_RING + 64 + 112 * (u64)(f->rsp_cons % BLK_RING_SIZE));
    short status = r->status;
    f->rsp_cons++;
    f->h->rsp_event = f->rsp_cons + 1;
    return status;
}

/* One request with one segment (none for a flush) of `op` at `sector` through grant
   `gref`, sectors `first..=last` of its page; waits for it and returns its status. */
static inline short blk_io(struct blk_front *f, u8 op, u64 sector, u32 gref, u8 first, u8 last,
                           u64 id)
{
    struct blkif_request *r = blk_slot(f, f->req_prod_pvt);
    memset(r, 0, sizeof *r);
    r->operation = op;
    r->id = id;
    r->sector_number = sector;
    if (op != BLKIF_OP_FLUSH_DISKCACHE) {
        r->nr_segments = 1;
        r->seg[0].gref = gref;
        r->seg[0].first_sect = first;
        r->seg[0].last_sect = last;
    }
    f->req_prod_pvt++;
    blk_push(f);
    return blk_wait(f);
}

#endif
