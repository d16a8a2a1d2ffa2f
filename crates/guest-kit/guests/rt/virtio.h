/* A minimal virtio-mmio (version 2) split-queue driver for test guests: probe,
   feature negotiation, queue setup, submit, notify (with event-index suppression)
   and polling for completions. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "guest.h"

#define VIRTIO_MAGIC 0x000
#define VIRTIO_VERSION 0x004
#define VIRTIO_DEVICE_ID 0x008
#define VIRTIO_DEVICE_FEATURES 0x010
#define VIRTIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_DRIVER_FEATURES 0x020
#define VIRTIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_QUEUE_SEL 0x030
#define VIRTIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_QUEUE_NUM 0x038
#define VIRTIO_QUEUE_READY 0x044
#define VIRTIO_QUEUE_NOTIFY 0x050
#define VIRTIO_INTERRUPT_STATUS 0x060
#define VIRTIO_INTERRUPT_ACK 0x064
#define VIRTIO_STATUS 0x070
#define VIRTIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_QUEUE_USED_HIGH 0x0a4
#define VIRTIO_CONFIG 0x100

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 64

#define F_EVENT_IDX (1ul << 29)
#define F_VERSION_1 (1ul << 32)

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

struct vq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vq_used_elem {
    u32 id;
    u32 len;
};

struct virtq {
    u64 mmio;
    u64 notify_addr;     /* where a notification is written (the queue index) */
    u32 index;
    u16 size;
    int event_idx;
    struct vq_desc *desc;
    volatile u16 *avail; /* flags, idx, ring[size], used_event */
    volatile u16 *used;  /* flags, idx, then elems; avail_event after them */
    u16 avail_idx;       /* next avail index the driver publishes */
    u16 last_used;       /* next used index the driver consumes */
    u64 notifications;   /* QueueNotify writes actually made */
    int polled;          /* no interrupts wanted (virtq_polled) */
};

static inline u32 vio_r(u64 base, u32 off) { return mmio_read32(base + off); }
static inline void vio_w(u64 base, u32 off, u32 v) { mmio_write32(base + off, v); }

/* Probe and negotiate: returns 0, or a negative step number on failure. `want` is
   the set of features to accept if offered (VERSION_1 is always required). */
static inline int virtio_init(u64 base, u32 device_id, u64 want, u64 *accepted)
{
    if (vio_r(base, VIRTIO_MAGIC) != 0x74726976)
        return -1;
    if (vio_r(base, VIRTIO_VERSION) != 2)
        return -2;
    if (vio_r(base, VIRTIO_DEVICE_ID) != device_id)
        return -3;
    vio_w(base, VIRTIO_STATUS, 0);
    vio_w(base, VIRTIO_STATUS, STATUS_ACK);
    vio_w(base, VIRTIO_STATUS, STATUS_ACK | STATUS_DRIVER);
    vio_w(base, VIRTIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = vio_r(base, VIRTIO_DEVICE_FEATURES);
    vio_w(base, VIRTIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)vio_r(base, VIRTIO_DEVICE_FEATURES) << 32;
    if (!(offered & F_VERSION_1))
        return -4;
    u64 take = offered & (want | F_VERSION_1);
    vio_w(base, VIRTIO_DRIVER_FEATURES_SEL, 0);
    vio_w(base, VIRTIO_DRIVER_FEATURES, (u32)take);
    vio_w(base, VIRTIO_DRIVER_FEATURES_SEL, 1);
    vio_w(base, VIRTIO_DRIVER_FEATURES, (u32)(take >> 32));
    vio_w(base, VIRTIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(vio_r(base, VIRTIO_STATUS) & STATUS_FEATURES_OK))
        return -5;
    *accepted = take;
    return 0;
}

/* The driver's side of queue `index`: `size` entries in the 12 KiB at `mem` (page
   aligned, zeroed here), nothing published or consumed yet. The transport sets where
   its notifications go. */
static inline void virtq_init_rings(struct virtq *q, u32 index, u16 size, u64 mem,
                                    int event_idx)
{
    memset((void *)mem, 0, 3 * 4096);
    q->index = index;
    q->size = size;
    q->event_idx = event_idx;
    q->desc = (struct vq_desc *)mem;
    q->avail = (volatile u16 *)(mem + 4096);
    q->used = (volatile u16 *)(mem + 2 * 4096);
    q->avail_idx = 0;
    q->last_used = 0;
    q->notifications = 0;
    q->polled = 0;
}

/* Set up queue `index` with `size` entries in the 12 KiB at `mem` (page aligned). */
static inline int virtq_setup(struct virtq *q, u64 base, u32 index, u16 size, u64 mem,
                              int event_idx)
{
    vio_w(base, VIRTIO_QUEUE_SEL, index);
    if (vio_r(base, VIRTIO_QUEUE_READY))
        return -10;
    u32 max = vio_r(base, VIRTIO_QUEUE_NUM_MAX);
    if (max < size)
        return -11;
    virtq_init_rings(q, index, size, mem, event_idx);
    q->mmio = base;
    q->notify_addr = base + VIRTIO_QUEUE_NOTIFY;
    vio_w(base, VIRTIO_QUEUE_NUM, size);
    vio_w(base, VIRTIO_QUEUE_DESC_LOW, (u32)mem);
    vio_w(base, VIRTIO_QUEUE_DESC_HIGH, (u32)(mem >> 32));
    vio_w(base, VIRTIO_QUEUE_AVAIL_LOW, (u32)(mem + 4096));
    vio_w(base, VIRTIO_QUEUE_AVAIL_HIGH, 0);
    vio_w(base, VIRTIO_QUEUE_USED_LOW, (u32)(mem + 2 * 4096));
    vio_w(base, VIRTIO_QUEUE_USED_HIGH, 0);
    vio_w(base, VIRTIO_QUEUE_READY, 1);
    if (vio_r(base, VIRTIO_QUEUE_READY) != 1)
        return -12;
    return 0;
}

static inline void virtio_driver_ok(u64 base)
{
    vio_w(base, VIRTIO_STATUS,
          STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}

/* Put chain `head` in the available ring (not yet visible). */
static inline void virtq_push(struct virtq *q, u16 head)
{
    q->avail[2 + (q->avail_idx % q->size)] = head;
    q->avail_idx++;
}

/* Publish pushed chains and notify the device if it wants to hear. */
static inline void virtq_kick(struct virtq *q, u16 old_idx)
{
    barrier();
    WRITE_ONCE(q->avail[1], q->avail_idx);
    mb();
    int notify;
    if (q->event_idx) {
        /* avail_event sits after the used ring's elements. */
        u16 event = *(volatile u16 *)((u64)q->used + 4 + 8 * (u64)q->size);
        notify = (u16)(q->avail_idx - event - 1) < (u16)(q->avail_idx - old_idx);
    } else {
        notify = !(q->used[0] & 1); /* VRING_USED_F_NO_NOTIFY */
    }
    if (notify) {
        mmio_write32(q->notify_addr, q->index);
        q->notifications++;
    }
}

/* Whether the device has completed chains we have not consumed. */
static inline int virtq_has_used(struct virtq *q)
{
    return READ_ONCE(q->used[1]) != q->last_used;
}

/* Wait for the next completion; returns its head id and stores its length. */
static inline u32 virtq_wait(struct virtq *q, u32 *len)
{
    while (!virtq_has_used(q))
        __asm__ volatile("pause");
    barrier();
    volatile struct vq_used_elem *elem =
        (volatile struct vq_used_elem *)((u64)q->used + 4 + 8 * (u64)(q->last_used % q->size));
    u32 id = elem->id;
    if (len)
        *len = elem->len;
    q->last_used++;
    if (q->event_idx && !q->polled)
        /* used_event: interrupt after the next completion (we poll, but keep it honest).
           A polled queue leaves it where virtq_polled put it: moving it along with what
           we consumed would ask for an interrupt whenever the device completes a chain
           while we are still consuming the ones before. */
        q->avail[2 + q->size] = q->last_used;
    return id;
}

/* Ask for no interrupts at all, as Linux's virtio-blk poll queues do: used_event set
   once, behind the used index, and left there (Linux writes 0 once; the device then
   asks for an interrupt only when the used index wraps past it, once per 65536
   completions), or VIRTQ_AVAIL_F_NO_INTERRUPT. */
static inline void virtq_polled(struct virtq *q)
{
    q->polled = 1;
    if (q->event_idx)
        q->avail[2 + q->size] = (u16)(q->last_used - 1);
    else
        q->avail[0] = 1;
}

#endif
