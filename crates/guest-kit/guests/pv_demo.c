/* The PV demo guest: prints through the PV console ring, then writes a page to the
   PV block device through a granted page, reads it back through another, flushes,
   and reports. Everything goes through hypercalls, shared rings, event channels and
   grants; no emulated device is touched. Exits 0 when the data came back intact. */
#include "guest.h"
#include "xen.h"

#define PAGE_A ((u64)GUEST_HEAP)
#define PAGE_B ((u64)GUEST_HEAP + 0x1000)

static struct blk_front f;

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    (void)param;
    pv_console_write("Hello from a paravirtual guest: this line crossed a shared ring.\n");

    blk_front_init(&f);
    for (u32 i = 0; i < 4096; i += 4)
        *(u32 *)(PAGE_A + i) = 0x9e3779b9u * (i + 1);
    memset((void *)PAGE_B, 0, 4096);
    grant_access(0, PAGE_A, 1); /* the backend reads it: read-only */
    grant_access(1, PAGE_B, 0); /* the backend writes it */
    if (blk_io(&f, BLKIF_OP_WRITE, 8, 0, 0, 7, 1) != 0)
        return 30;
    if (blk_io(&f, BLKIF_OP_READ, 8, 1, 0, 7, 2) != 0)
        return 31;
    if (memcmp((void *)PAGE_A, (void *)PAGE_B, 4096))
        return 32;
    if (blk_io(&f, BLKIF_OP_FLUSH_DISKCACHE, 0, 0, 0, 0, 3) != 0)
        return 33;
    /* A request the backend must refuse: a segment past its page. */
    if (blk_io(&f, BLKIF_OP_READ, 0, 1, 0, 8, 4) != -1)
        return 34;
    pv_console_write("pv block ok: wrote, read back and flushed a page through grants\n");
    return 0;
}
