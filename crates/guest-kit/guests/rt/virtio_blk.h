/* virtio-blk requests for test guests: request layout and submission. Request slot
   `s` uses descriptors 3s..3s+2, header HEADERS + 16s and status byte STATUSES + s. */
#ifndef VIRTIO_BLK_H
#define VIRTIO_BLK_H
#include "virtio.h"

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1

#define QUEUE_MEM ((u64)GUEST_HEAP)
#define HEADERS ((u64)GUEST_HEAP + 0x4000)
#define STATUSES ((u64)GUEST_HEAP + 0x5000)
#define DATA ((u64)GUEST_HEAP + 0x10000)

struct blk_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

/* Build request `slot` and push it (not yet published). */
static inline void blk_submit(struct virtq *q, int slot, u32 type, u64 sector, u64 buf, u32 len)
{
    struct blk_header *h = (struct blk_header *)(HEADERS + 16 * slot);
    volatile u8 *status = (volatile u8 *)(STATUSES + slot);
    h->type = type;
    h->reserved = 0;
    h->sector = sector;
    *status = 0xff;
    u16 d = 3 * slot;
    if (len) {
        u16 data_flags = DESC_F_NEXT | (type == BLK_T_OUT ? 0 : DESC_F_WRITE);
        q->desc[d] = (struct vq_desc){(u64)h, 16, DESC_F_NEXT, d + 1};
        q->desc[d + 1] = (struct vq_desc){buf, len, data_flags, d + 2};
    } else {
        q->desc[d] = (struct vq_desc){(u64)h, 16, DESC_F_NEXT, d + 2};
    }
    q->desc[d + 2] = (struct vq_desc){(u64)status, 1, DESC_F_WRITE, 0};
    virtq_push(q, d);
}

static inline u8 blk_status(int slot) { return *(volatile u8 *)(STATUSES + slot); }

/* VIRTIO_BLK_F_FLUSH: completed writes are stable only after a FLUSH (without it the
   device makes every write stable before completing it). */
#define BLK_F_FLUSH (1ul << 9)

/* Probe, negotiate FLUSH (and EVENT_IDX if `event_idx`), set up queue 0 with `size`
   entries. */
static inline int blk_init(struct virtq *q, u16 size, int event_idx)
{
    u64 features;
    u64 want = BLK_F_FLUSH | (event_idx ? F_EVENT_IDX : 0);
    int err = virtio_init(VIRTIO_MMIO_BASE, 2, want, &features);
    if (err)
        return err;
    err = virtq_setup(q, VIRTIO_MMIO_BASE, 0, size, QUEUE_MEM, !!(features & F_EVENT_IDX));
    if (err)
        return err;
    virtio_driver_ok(VIRTIO_MMIO_BASE);
    return 0;
}

#endif
