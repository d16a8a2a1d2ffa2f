/* Console output load: `count` bytes ('x', a newline every 64) through one of three
   paths, in 4 KiB chunks whose latencies (TSC ticks) go to LATENCIES.
   Path (parameter bits 0..1): 0 = the emulated 16550 (poll LSR for THRE, then THR,
   per byte, as an unmodified driver does); 1 = virtio-console at VIRTIO_MMIO_BASE (one
   4 KiB transmit buffer per chunk); 2 = the PV console ring (notify when full and at
   the end of each chunk). Bits 16..47: count. Exits 0. */
#include "guest.h"
#include "virtio.h"
#include "xen.h"

#define CHUNK 4096
#define TEXT ((u64)GUEST_HEAP)
#define RXQ_MEM ((u64)GUEST_HEAP + 0x2000)
#define TXQ_MEM ((u64)GUEST_HEAP + 0x8000)

static struct virtq rx, tx;

static void uart_write(const char *s, u64 n)
{
    for (u64 i = 0; i < n; i++) {
        while (!(inb(COM1_PORT + 5) & 0x20))
            ;
        outb(COM1_PORT, (u8)s[i]);
    }
}

static void virtio_write(const char *s, u64 n)
{
    u16 old = tx.avail_idx;
    tx.desc[0] = (struct vq_desc){(u64)s, (u32)n, 0, 0};
    virtq_push(&tx, 0);
    virtq_kick(&tx, old);
    virtq_wait(&tx, 0);
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    int path = param & 3;
    u64 count = (param >> 16) & 0xffffffff;
    char *text = (char *)TEXT;
    for (int i = 0; i < CHUNK; i++)
        text[i] = i % 64 == 63 ? '\n' : 'x';
    if (path == 1) {
        u64 features;
        int err = virtio_init(VIRTIO_MMIO_BASE, 3, F_EVENT_IDX, &features);
        if (err)
            return 100 - err;
        int ev = !!(features & F_EVENT_IDX);
        if ((err = virtq_setup(&rx, VIRTIO_MMIO_BASE, 0, 16, RXQ_MEM, ev)) ||
            (err = virtq_setup(&tx, VIRTIO_MMIO_BASE, 1, 16, TXQ_MEM, ev)))
            return 100 - err;
        virtio_driver_ok(VIRTIO_MMIO_BASE);
    }
    u64 chunks = 0;
    for (u64 done = 0; done < count;) {
        u64 n = count - done < CHUNK ? count - done : CHUNK;
        u64 t0 = rdtsc();
        if (path == 0)
            uart_write(text, n);
        else if (path == 1)
            virtio_write(text, n);
        else
            pv_console_write_n(text, n);
        ((volatile u64 *)LATENCIES)[chunks++ % 65536] = rdtsc() - t0;
        done += n;
    }
    return 0;
}
