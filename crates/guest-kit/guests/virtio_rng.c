/* Drives the virtio-rng device at VIRTIO_MMIO_BASE from CPL 3: two 64-byte requests
   must come back full and different, and a 128 KiB request must be cut to the
   device's 64 KiB cap. Prints "rng ok" and exits 0, or exits with the failed step. */
#include "guest.h"
#include "virtio.h"

#define QMEM ((u64)GUEST_HEAP)
#define BUF_A ((u64)GUEST_HEAP + 0x10000)
#define BUF_B ((u64)GUEST_HEAP + 0x11000)
#define BIG ((u64)GUEST_HEAP + 0x20000)

static struct virtq q;

static u32 request(u64 buf, u32 len)
{
    u16 old = q.avail_idx;
    q.desc[0] = (struct vq_desc){buf, len, DESC_F_WRITE, 0};
    virtq_push(&q, 0);
    virtq_kick(&q, old);
    u32 got;
    virtq_wait(&q, &got);
    return got;
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    (void)param;
    u64 base = VIRTIO_MMIO_BASE, features;
    int err = virtio_init(base, 4, F_EVENT_IDX, &features);
    if (err)
        return 100 - err;
    if ((err = virtq_setup(&q, base, 0, 8, QMEM, !!(features & F_EVENT_IDX))))
        return 100 - err;
    virtio_driver_ok(base);
    memset((void *)BUF_A, 0, 64);
    memset((void *)BUF_B, 0, 64);
    if (request(BUF_A, 64) != 64 || request(BUF_B, 64) != 64)
        return 60;
    if (!memcmp((void *)BUF_A, (void *)BUF_B, 64))
        return 61;
    if (request(BIG, 128 << 10) != 64 << 10)
        return 62;
    puts_com1("rng ok\n");
    return 0;
}
