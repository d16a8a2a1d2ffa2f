/* A hostile guest for soak tests: `count` random actions (parameter bits 16..47; the
   xorshift seed is bits 0..15 plus one), each one of
     - a write of a random value and width to a random I/O port (0 to 0xffff: the
       legacy devices, the PV doorbell, unclaimed ports), or a read of one;
     - a hypercall with a random number and random arguments;
     - a write of a random value to a random register of one of the first `WINDOWS`
       virtio-mmio windows (status, queue addresses, notifications, features...), or
       a read of one;
     - random bytes into guest memory where rings live: the heap (virtqueues, buffers)
       and the PV pages (shared info, console ring, blkif ring, grant table).
     - a notification of a random queue, or of a PV event-channel port through the
       doorbell.
   Every 50,000 actions (and first) it brings the three virtio devices of windows 0
   to 2 up properly (negotiation, queues in RINGS, DRIVER_OK), so that the random
   bytes land in live virtqueues the devices parse.
   Any of them may end the VM (a reset through the i8042, a power-off, the debug-exit
   port, a device writing over this code): the host starts another. Exits 0 after
   `count` actions. */
#include "guest.h"
#include "virtio.h"
#include "xen.h"

#define WINDOWS 4
#define PV_PAGES 0x300000ul
#define HEAP_SPAN 0x400000ul
/* The live virtqueues: 3 pages each, two queues per device. */
#define RINGS ((u64)GUEST_HEAP)
#define RINGS_SPAN (3 * 3 * 2 * 4096ul)

static struct virtq queues[3][2];

/* Bring up the device in window `w` with queues 0 and 1 (where it has them). */
static void bring_up(int w)
{
    u64 base = VIRTIO_MMIO_BASE + 0x1000 * (u64)w;
    u64 features;
    u32 id = vio_r(base, VIRTIO_DEVICE_ID);
    if (virtio_init(base, id, F_EVENT_IDX, &features))
        return;
    for (int i = 0; i < 2; i++) {
        vio_w(base, VIRTIO_QUEUE_SEL, i);
        if (vio_r(base, VIRTIO_QUEUE_NUM_MAX) < 16)
            break;
        virtq_setup(&queues[w][i], base, i, 16, RINGS + (u64)(2 * w + i) * 3 * 4096,
                    !!(features & F_EVENT_IDX));
    }
    virtio_driver_ok(base);
}

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }

u32 guest_main(u64 vcpu, u64 param)
{
    u64 seed = (param & 0xffff) + 1;
    u64 count = (param >> 16) & 0xffffffff;
    for (u64 i = 0; i < count; i++) {
        if (i % 50000 == 0)
            for (int w = 0; w < 3; w++)
                bring_up(w);
        u64 r = xorshift(&seed);
        u64 v = xorshift(&seed);
        switch (r % 12) {
        case 0: {
            u16 port = (u16)(v >> 16);
            if (port == DEBUG_EXIT_PORT)
                break; /* ends the guest with a code: not what a soak is about */
            switch ((v >> 8) & 3) {
            case 0: outb(port, (u8)v); break;
            case 1: outw(port, (u16)v); break;
            case 2: outl(port, (u32)v); break;
            default: (void)inb(port); break;
            }
            break;
        }
        case 1:
            (void)hypercall(v % 64, xorshift(&seed), xorshift(&seed), xorshift(&seed),
                            xorshift(&seed), xorshift(&seed));
            break;
        case 2:
        case 3: {
            u64 window = VIRTIO_MMIO_BASE + 0x1000 * ((v >> 32) % WINDOWS);
            u64 reg = (v >> 40) & 0x1fc; /* every register of the first 512 bytes */
            if (r & 0x100)
                (void)mmio_read32(window + reg);
            else
                mmio_write32(window + reg, (u32)v);
            break;
        }
        case 4:
        case 5:
        case 6:
        case 7:
            /* The live virtqueues: descriptors, available and used rings. */
            *(volatile u64 *)(RINGS + ((v >> 8) % RINGS_SPAN & ~7ul)) = xorshift(&seed);
            break;
        case 8:
            /* Anywhere in the heap (buffers, and rings a random register write moved). */
            *(volatile u64 *)(GUEST_HEAP + ((v >> 8) % HEAP_SPAN & ~7ul)) = xorshift(&seed);
            break;
        case 9:
            mmio_write32(VIRTIO_MMIO_BASE + 0x1000 * ((v >> 8) % 3) + VIRTIO_QUEUE_NOTIFY,
                         (u32)(v >> 32) % 3);
            break;
        case 10:
            outl(PV_DOORBELL_PORT, (u32)(v >> 8) % 4);
            break;
        default:
            /* The PV pages: shared info, console ring, blkif ring, grant table. */
            *(volatile u64 *)(PV_PAGES + ((v >> 8) % 0x4000 & ~7ul)) = xorshift(&seed);
            break;
        }
    }
    (void)vcpu;
    return 0;
}
