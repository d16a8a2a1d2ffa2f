/* PV block load generator: `count` 4 KiB reads (writes with parameter bit 1) in
   batches of `batch` behind one publish each, through 32 granted pages, over the
   first 16 MiB of the disk. Parameter: bit 1 write, bit 2 random offsets, bits 8..15
   batch (1..32), bits 16..47 count. Each batch's latency in TSC ticks goes to
   LATENCIES. Prints "notifications <hex>" and exits 0 when every request succeeded. */
#include "guest.h"
#include "xen.h"

#define PAGES ((u64)GUEST_HEAP + 0x100000)

static struct blk_front f;

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    u32 batch = (param >> 8) & 0xff;
    u64 count = (param >> 16) & 0xffffffff;
    u8 op = param & 2 ? BLKIF_OP_WRITE : BLKIF_OP_READ;
    if (batch < 1 || batch > BLK_RING_SIZE)
        return 2;
    blk_front_init(&f);
    for (u32 i = 0; i < BLK_RING_SIZE; i++)
        grant_access(i, PAGES + 4096 * (u64)i, op == BLKIF_OP_WRITE);
    u64 done = 0, sector = 0, seed = 0x9e3779b97f4a7c15ul, batches = 0;
    int random = param & 4;
    while (done < count) {
        u32 n = count - done < batch ? (u32)(count - done) : batch;
        u64 t0 = rdtsc();
        for (u32 i = 0; i < n; i++) {
            struct blkif_request *r = blk_slot(&f, f.req_prod_pvt);
            r->operation = op;
            r->nr_segments = 1;
            r->id = done + i;
            if (random)
                sector = xorshift(&seed) % (2u << 11) * 8;
            r->sector_number = sector;
            r->seg[0].gref = i;
            r->seg[0].first_sect = 0;
            r->seg[0].last_sect = 7;
            f.req_prod_pvt++;
            if (!random)
                sector = (sector + 8) % (16 << 11);
        }
        blk_push(&f);
        for (u32 i = 0; i < n; i++)
            if (blk_wait(&f) != 0)
                return 3;
        ((volatile u64 *)LATENCIES)[batches++ % 65536] = rdtsc() - t0;
        done += n;
    }
    pv_console_write("notifications ");
    char hex[19];
    static const char digits[] = "0123456789abcdef";
    hex[0] = '0';
    hex[1] = 'x';
    for (int i = 0; i < 16; i++)
        hex[2 + i] = digits[(f.notifications >> (60 - 4 * i)) & 0xf];
    hex[18] = 0;
    pv_console_write(hex);
    pv_console_write("\n");
    return 0;
}
