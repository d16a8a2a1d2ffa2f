/* A virtio-balloon driver at CPL 3, for balloon tests: drives the device at
   VIRTIO_MMIO_BASE (inflate and deflate queues, no statistics). It first writes every
   page of a 16 MiB pool at 16 MiB (so the host holds them), prints "ready" on COM1,
   then forever: reads the target (`num_pages`) from the config space; inflates pages
   from the top of the pool (256 per chain) while it holds fewer, deflates while it
   holds more, writes `actual` after each chain, and after a deflate writes and checks
   every page it got back. Prints "deflated ok <pages>" after each deflate that
   checked out, "inflated <pages>" after each inflate; a page that does not read back
   prints "bad page" and exits 1. */
#include "guest.h"
#include "balloon.h"

#define POOL ((u64)0x1000000)
#define POOL_PAGES 4096u
#define PER_CHAIN 256u

static struct virtq inflate_q, deflate_q;


u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    (void)param;
    u64 features;
    int err = virtio_init(VIRTIO_MMIO_BASE, 5, 0, &features);
    if (err)
        return 100 - err;
    if (virtq_setup(&inflate_q, VIRTIO_MMIO_BASE, 0, 16, GUEST_HEAP + 0x10000, 0) ||
        virtq_setup(&deflate_q, VIRTIO_MMIO_BASE, 1, 16, GUEST_HEAP + 0x20000, 0))
        return 90;
    virtio_driver_ok(VIRTIO_MMIO_BASE);
    for (u32 p = 0; p < POOL_PAGES; p++)
        *(volatile u64 *)(POOL + 4096ul * p) = p + 1;
    puts_com1("ready\n");
    u32 held = 0;
    for (;;) {
        u32 target = vio_r(VIRTIO_MMIO_BASE, VIRTIO_CONFIG);
        if (target > POOL_PAGES)
            target = POOL_PAGES;
        if (held < target) {
            u32 n = target - held < PER_CHAIN ? target - held : PER_CHAIN;
            /* The pool's pages from the top down: page POOL_PAGES - 1 - held first. */
            balloon_send(&inflate_q, POOL, POOL_PAGES - 1 - held, n);
            held += n;
            vio_w(VIRTIO_MMIO_BASE, VIRTIO_CONFIG + 4, held);
            if (held == target) {
                puts_com1("inflated ");
                put_hex(held);
                puts_com1("\n");
            }
        } else if (held > target) {
            u32 n = held - target < PER_CHAIN ? held - target : PER_CHAIN;
            u32 first = POOL_PAGES - held + n - 1;
            balloon_send(&deflate_q, POOL, first, n);
            held -= n;
            vio_w(VIRTIO_MMIO_BASE, VIRTIO_CONFIG + 4, held);
            /* The pages are ours again: use them. */
            for (u32 i = 0; i < n; i++) {
                volatile u64 *page = (volatile u64 *)(POOL + 4096ul * (first - i));
                *page = 0xb0b0b0b0ul + i;
                if (*page != 0xb0b0b0b0ul + i) {
                    puts_com1("bad page\n");
                    return 1;
                }
            }
            if (held == target) {
                puts_com1("deflated ok ");
                put_hex(held);
                puts_com1("\n");
            }
        } else {
            __asm__ volatile("pause");
        }
    }
}
