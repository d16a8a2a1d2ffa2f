/* virtio-blk load generator: `count` 4 KiB requests (reads, or writes with parameter
   bit 1) in batches of `batch` behind one kick each, over the first 16 MiB of the disk.
   Parameter: bit 0 EVENT_IDX, bit 1 write, bit 2 random offsets, bit 3 a polled queue
   (no interrupts wanted), bits 8..15 batch (1..32), bits 16..47 count. Each batch's latency in TSC ticks goes to LATENCIES.
   Exits 0 when every request succeeded; prints the kicks it made. */
#include "guest.h"
#include "virtio_blk.h"

#define QSIZE 128
#define MAX_BATCH 32

static struct virtq q;

u32 guest_main(u64 vcpu, u64 param)
{
    int batch = (param >> 8) & 0xff;
    u64 count = (param >> 16) & 0xffffffff;
    u32 type = param & 2 ? BLK_T_OUT : BLK_T_IN;
    if (batch < 1 || batch > MAX_BATCH)
        return 2;
    int err = blk_init(&q, QSIZE, param & 1);
    if (err)
        return 100 - err;
    if (param & 8)
        virtq_polled(&q);
    u64 done = 0, sector = 0, seed = 0x9e3779b97f4a7c15ul, batches = 0;
    int random = param & 4;
    while (done < count) {
        int n = count - done < (u64)batch ? (int)(count - done) : batch;
        u64 t0 = rdtsc();
        u16 old = q.avail_idx;
        for (int s = 0; s < n; s++) {
            if (random)
                sector = xorshift(&seed) % (2u << 11) * 8;
            blk_submit(&q, s, type, sector, DATA + 4096 * (u64)s, 4096);
            if (!random)
                sector = (sector + 8) % (16 << 11);
        }
        virtq_kick(&q, old);
        for (int s = 0; s < n; s++)
            virtq_wait(&q, 0);
        for (int s = 0; s < n; s++)
            if (blk_status(s) != BLK_S_OK)
                return 3;
        ((volatile u64 *)LATENCIES)[batches++ % 65536] = rdtsc() - t0;
        done += n;
    }
    puts_com1("kicks ");
    put_hex(q.notifications);
    puts_com1("\n");
    (void)vcpu;
    return 0;
}
