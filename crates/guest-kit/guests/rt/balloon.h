/* The page-number chains of a virtio-balloon driver, for test guests. */
#ifndef BALLOON_H
#define BALLOON_H
#include "virtio.h"

/* Where the page numbers of a chain are built (1 KiB: 256 of them). */
#define BALLOON_PFNS ((u64)GUEST_HEAP + 0x4000)

/* Send, in one chain on `q`, the `n` page numbers of the pages at `pool` +
   4 KiB × first, first - 1, ... (the pool's top down); wait for the device. */
static inline void balloon_send(struct virtq *q, u64 pool, u32 first, u32 n)
{
    volatile u32 *pfns = (volatile u32 *)BALLOON_PFNS;
    for (u32 i = 0; i < n; i++)
        pfns[i] = (u32)(pool >> 12) + first - i;
    u16 old = q->avail_idx;
    q->desc[0] = (struct vq_desc){BALLOON_PFNS, 4 * n, 0, 0};
    virtq_push(q, 0);
    virtq_kick(q, old);
    virtq_wait(q, 0);
}

#endif
