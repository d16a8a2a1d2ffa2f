/* virtio-blk load generator: `count` 4 KiB requests (reads, or writes with parameter
   bit 1) in batches of `batch` behind one kick per queue each, over the first 16 MiB of
   the disk. Parameter: bit 0 EVENT_IDX, bit 1 write, bit 2 random offsets, bit 3 polled
   queues (no interrupts wanted), bit 4 the disk is virtio-pci function 1 (MSI-X on)
   instead of the first virtio-mmio window, bits 5..7 queues - 1 (PCI only; a batch's
   requests go round-robin over them), bits 8..15 batch (1..32), bits 16..47 count,
   bits 48..59 the ECAM window's address >> 20 (PCI). Each batch's latency in TSC ticks
   goes to LATENCIES. Exits 0 when every request succeeded; prints the kicks it made. */
#include "guest.h"
#include "virtio_blk.h"
#include "virtio_pci.h"

#define QSIZE 128
#define MAX_BATCH 32
#define MAX_QUEUES 8

static struct virtq qs[MAX_QUEUES];
static struct vpci pci;

/* Queue 0's rings where blk_init puts them; the others' after the data buffers. */
static u64 ring_mem(int i) { return i ? (u64)GUEST_HEAP + 0x40000 + 0x4000 * (u64)i : QUEUE_MEM; }

static int pci_init(u64 ecam, int queues, int event_idx)
{
    u64 features;
    int err = vpci_init(&pci, ecam, 1, 2, BLK_F_FLUSH | (event_idx ? F_EVENT_IDX : 0), &features);
    if (err)
        return err;
    if (queues > pci.num_queues)
        return -20;
    for (int i = 0; i < queues; i++)
        if ((err = vpci_queue_setup(&pci, &qs[i], i, QSIZE, ring_mem(i),
                                    !!(features & F_EVENT_IDX))))
            return err;
    vpci_driver_ok(&pci);
    return 0;
}

u32 guest_main(u64 vcpu, u64 param)
{
    int batch = (param >> 8) & 0xff;
    u64 count = (param >> 16) & 0xffffffff;
    u32 type = param & 2 ? BLK_T_OUT : BLK_T_IN;
    int queues = ((param >> 5) & 7) + 1;
    if (batch < 1 || batch > MAX_BATCH)
        return 2;
    int err = param & 16 ? pci_init(((param >> 48) & 0xfff) << 20, queues, param & 1)
                         : queues == 1 ? blk_init(&qs[0], QSIZE, param & 1) : -21;
    if (err)
        return 100 - err;
    if (param & 8)
        for (int i = 0; i < queues; i++)
            virtq_polled(&qs[i]);
    u64 done = 0, sector = 0, seed = 0x9e3779b97f4a7c15ul, batches = 0;
    int random = param & 4;
    while (done < count) {
        int n = count - done < (u64)batch ? (int)(count - done) : batch;
        u64 t0 = rdtsc();
        u16 old[MAX_QUEUES];
        for (int i = 0; i < queues; i++)
            old[i] = qs[i].avail_idx;
        for (int s = 0; s < n; s++) {
            if (random)
                sector = xorshift(&seed) % (2u << 11) * 8;
            blk_submit(&qs[s % queues], s, type, sector, DATA + 4096 * (u64)s, 4096);
            if (!random)
                sector = (sector + 8) % (16 << 11);
        }
        for (int i = 0; i < queues && i < n; i++)
            virtq_kick(&qs[i], old[i]);
        for (int s = 0; s < n; s++)
            virtq_wait(&qs[s % queues], 0);
        for (int s = 0; s < n; s++)
            if (blk_status(s) != BLK_S_OK)
                return 3;
        ((volatile u64 *)LATENCIES)[batches++ % 65536] = rdtsc() - t0;
        done += n;
    }
    u64 kicks = 0;
    for (int i = 0; i < queues; i++)
        kicks += qs[i].notifications;
    puts_com1("kicks ");
    put_hex(kicks);
    puts_com1("\n");
    (void)vcpu;
    return 0;
}
