/* A guest whose working set rises and falls as the host says, with a virtio-balloon
   driver of its own (inflate, deflate, statistics, deflate on OOM), for the memory
   balancer's tests and benchmark. It drives the device at VIRTIO_MMIO_BASE.

   RAM from POOL (16 MiB) up is its pool of `pool` pages (parameter bits 0..31); the
   16 MiB below count as its kernel. The host writes the working set it wants, in
   pages, at PHASED_MAILBOX (u32). The guest then:
   - uses pages [0, ws) of the pool: a rise writes each new page (its index and a
     generation) and checks that every page it kept still holds what it wrote; a fall
     only forgets pages, which stay resident on the host as a freed page in a real
     guest does, until the balloon takes them;
   - keeps the balloon at the device's target (`num_pages`) with the free pages at the
     top of the pool (never a page of the working set): inflating at most 256 pages
     per chain, deflating when the target falls, writing `actual` after each chain;
   - deflates on OOM: a working set that needs pages the balloon holds takes them back
     at once (VIRTIO_BALLOON_F_DEFLATE_ON_OOM) and counts them;
   - answers each statistics request with total, free and available memory as Linux
     reports them with deflate on OOM (the balloon's pages count in the total, as
     allocated pages).
   It reports at PHASED_MAILBOX + 4 the working set it has in place (u32), + 8 the
   pages it held in the balloon (u32), + 12 the pages deflated on OOM so far (u32).
   Prints "ready" on COM1 once the driver runs; a page that lost its contents prints
   "bad page <index>" and exits 1. */
#include "guest.h"
#include "balloon.h"

#define POOL ((u64)0x1000000)
#define KERNEL_PAGES (POOL >> 12)
#define MAILBOX ((volatile u32 *)((u64)GUEST_HEAP + 0x30000))
#define STATS ((u64)GUEST_HEAP + 0x5000)
#define PER_CHAIN 256u
#define F_STATS_VQ (1ul << 1)
#define F_DEFLATE_ON_OOM (1ul << 2)

static struct virtq inflate_q, deflate_q, stats_q;
static u32 pool, ws, held, generation;

static u64 page_addr(u32 p) { return POOL + 4096ul * p; }


/* Give the balloon's lowest `n` pages back (the pool's pages pool - held up). */
static void deflate(u32 n)
{
    while (n) {
        u32 k = n < PER_CHAIN ? n : PER_CHAIN;
        balloon_send(&deflate_q, POOL, pool - held + k - 1, k);
        held -= k;
        n -= k;
        vio_w(VIRTIO_MMIO_BASE, VIRTIO_CONFIG + 4, held);
    }
}

static void put_stat(volatile u8 *at, u16 tag, u64 value)
{
    at[0] = (u8)tag;
    at[1] = (u8)(tag >> 8);
    for (int i = 0; i < 8; i++)
        at[2 + i] = (u8)(value >> (8 * i));
}

/* Fill the statistics buffer and hand it to the device. */
static void post_stats(void)
{
    volatile u8 *s = (volatile u8 *)STATS;
    /* As Linux with DEFLATE_ON_OOM: the balloon's pages stay in the total. */
    u64 total = 4096ul * (KERNEL_PAGES + pool);
    u64 free_bytes = 4096ul * (pool - held - ws);
    put_stat(s, 4, free_bytes);  /* free */
    put_stat(s + 10, 5, total);  /* total */
    put_stat(s + 20, 6, free_bytes); /* available */
    u16 old = stats_q.avail_idx;
    stats_q.desc[0] = (struct vq_desc){STATS, 30, 0, 0};
    virtq_push(&stats_q, 0);
    virtq_kick(&stats_q, old);
}

/* Make the working set `want` pages. */
static int set_working_set(u32 want)
{
    /* Every page kept must still hold what was written. */
    u32 keep = want < ws ? want : ws;
    for (u32 p = 0; p < keep; p++) {
        volatile u64 *w = (volatile u64 *)page_addr(p);
        if ((u32)*w != p) {
            puts_com1("bad page ");
            put_hex(p);
            puts_com1("\n");
            return 1;
        }
    }
    if (want > ws) {
        if (want > pool - held) {
            u32 n = want - (pool - held);
            deflate(n);
            MAILBOX[3] += n;
        }
        generation++;
        for (u32 p = ws; p < want; p++) {
            volatile u64 *w = (volatile u64 *)page_addr(p);
            *w = (u64)generation << 32 | p;
        }
    }
    ws = want;
    return 0;
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    pool = (u32)param;
    u64 features;
    int err = virtio_init(VIRTIO_MMIO_BASE, 5, F_STATS_VQ | F_DEFLATE_ON_OOM, &features);
    if (err)
        return 100 - err;
    if (!(features & F_STATS_VQ))
        return 80;
    if (virtq_setup(&inflate_q, VIRTIO_MMIO_BASE, 0, 16, GUEST_HEAP + 0x10000, 0) ||
        virtq_setup(&deflate_q, VIRTIO_MMIO_BASE, 1, 16, GUEST_HEAP + 0x20000, 0) ||
        virtq_setup(&stats_q, VIRTIO_MMIO_BASE, 2, 16, GUEST_HEAP + 0x40000, 0))
        return 90;
    virtio_driver_ok(VIRTIO_MMIO_BASE);
    post_stats();
    puts_com1("ready\n");
    for (;;) {
        u32 want = MAILBOX[0];
        if (want > pool)
            want = pool;
        if (want != ws && set_working_set(want))
            return 1;
        MAILBOX[1] = ws;
        u32 target = vio_r(VIRTIO_MMIO_BASE, VIRTIO_CONFIG);
        if (target > pool)
            target = pool;
        u32 free_pages = pool - held - ws;
        if (held < target && free_pages) {
            u32 n = target - held;
            if (n > PER_CHAIN)
                n = PER_CHAIN;
            if (n > free_pages)
                n = free_pages;
            /* The free pages from the top down: page pool - 1 - held first. */
            balloon_send(&inflate_q, POOL, pool - 1 - held, n);
            held += n;
            vio_w(VIRTIO_MMIO_BASE, VIRTIO_CONFIG + 4, held);
        } else if (held > target) {
            deflate(held - target < PER_CHAIN ? held - target : PER_CHAIN);
        }
        MAILBOX[2] = held;
        if (virtq_has_used(&stats_q)) {
            virtq_wait(&stats_q, 0);
            post_stats();
        }
        __asm__ volatile("pause");
    }
}
