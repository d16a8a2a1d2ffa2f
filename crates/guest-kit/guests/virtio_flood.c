/* A hostile virtio-blk driver: floods the device at VIRTIO_MMIO_BASE with one kind of
   abuse, `rounds` times (parameter bits 8..31), then checks the device still serves a
   well-formed request. Kind (parameter bits 0..7):
     1  chains whose data buffer names nearly 4 GiB (it runs off guest memory): each
        must set NEEDS_RESET; the driver then resets and starts again;
     2  chains that loop (a descriptor whose next is itself): NEEDS_RESET, reset;
     3  an available index that races a whole ring ahead of what was published:
        NEEDS_RESET, reset;
     4  a notification storm: QueueNotify written `rounds` times with nothing new;
     5  requests whose data buffer is in guest memory but larger than the device's
        size_max (2 MiB): each gets an error status, the queue goes on; `rounds`
        requests in batches of 16.
   Prints "flood <kind> done <rounds>" and exits 0 when the device behaved as the
   virtio 1.2 spec and our device documentation say each time, else a step's code. */
#include "guest.h"
#include "virtio_blk.h"

#define QSIZE 64

static struct virtq q;

static int needs_reset(void)
{
    return vio_r(VIRTIO_MMIO_BASE, VIRTIO_STATUS) & STATUS_NEEDS_RESET;
}

/* Wait until the device sets NEEDS_RESET (bounded: the device must be quick). */
static int wait_needs_reset(void)
{
    for (u64 i = 0; i < 200000000ul; i++) {
        if (needs_reset())
            return 0;
        __asm__ volatile("pause");
    }
    return 1;
}

/* A well-formed 4 KiB write and read back at `sector`: 0 when it round-trips. */
static int round_trip(u64 sector)
{
    for (u32 i = 0; i < 4096; i += 4)
        *(u32 *)(DATA + i) = i * 2654435761u ^ (u32)sector;
    u16 old = q.avail_idx;
    blk_submit(&q, 0, BLK_T_OUT, sector, DATA, 4096);
    virtq_kick(&q, old);
    virtq_wait(&q, 0);
    if (blk_status(0) != BLK_S_OK)
        return 1;
    memset((void *)(DATA + 0x10000), 0, 4096);
    old = q.avail_idx;
    blk_submit(&q, 0, BLK_T_IN, sector, DATA + 0x10000, 4096);
    virtq_kick(&q, old);
    virtq_wait(&q, 0);
    if (blk_status(0) != BLK_S_OK)
        return 2;
    return memcmp((void *)DATA, (void *)(DATA + 0x10000), 4096) ? 3 : 0;
}

/* Publish one broken chain of `kind` (1, 2 or 3) and notify. */
static void publish_broken(int kind)
{
    struct blk_header *h = (struct blk_header *)HEADERS;
    h->type = BLK_T_IN;
    h->reserved = 0;
    h->sector = 0;
    u16 old = q.avail_idx;
    if (kind == 1) {
        q.desc[0] = (struct vq_desc){(u64)h, 16, DESC_F_NEXT, 1};
        q.desc[1] = (struct vq_desc){DATA, 0xfffff000u, DESC_F_NEXT | DESC_F_WRITE, 2};
        q.desc[2] = (struct vq_desc){STATUSES, 1, DESC_F_WRITE, 0};
        virtq_push(&q, 0);
    } else if (kind == 2) {
        q.desc[0] = (struct vq_desc){(u64)h, 16, DESC_F_NEXT, 0};
        virtq_push(&q, 0);
    } else {
        q.desc[0] = (struct vq_desc){(u64)h, 16, DESC_F_NEXT, 2};
        q.desc[2] = (struct vq_desc){STATUSES, 1, DESC_F_WRITE, 0};
        q.avail[2] = 0;
        q.avail_idx += QSIZE + 1; /* claims more chains than the ring holds */
    }
    virtq_kick(&q, old);
}

u32 guest_main(u64 vcpu, u64 param)
{
    int kind = param & 0xff;
    u64 rounds = (param >> 8) & 0xffffff;
    int err = blk_init(&q, QSIZE, 1);
    if (err)
        return 100 - err;
    for (u64 r = 0; r < rounds; r++) {
        if (kind >= 1 && kind <= 3) {
            publish_broken(kind);
            if (wait_needs_reset())
                return 10 + kind;
            /* Reset and bring the device up again. */
            vio_w(VIRTIO_MMIO_BASE, VIRTIO_STATUS, 0);
            if (vio_r(VIRTIO_MMIO_BASE, VIRTIO_STATUS) != 0)
                return 20;
            err = blk_init(&q, QSIZE, 1);
            if (err)
                return 100 - err;
        } else if (kind == 4) {
            vio_w(VIRTIO_MMIO_BASE, VIRTIO_QUEUE_NOTIFY, 0);
        } else if (kind == 5) {
            /* 16 slots of 3 descriptors fit the 64-entry queue. */
            int n = rounds - r < 16 ? (int)(rounds - r) : 16;
            u16 old = q.avail_idx;
            for (int s = 0; s < n; s++)
                blk_submit(&q, s, BLK_T_IN, 0, DATA, 2u << 20);
            virtq_kick(&q, old);
            for (int s = 0; s < n; s++)
                virtq_wait(&q, 0);
            for (int s = 0; s < n; s++)
                if (blk_status(s) != BLK_S_IOERR)
                    return 30;
            if (needs_reset())
                return 31;
            r += n - 1;
        } else {
            return 2;
        }
    }
    err = round_trip(8);
    if (err)
        return 40 + err;
    puts_com1("flood ");
    put_hex(kind);
    puts_com1(" done ");
    put_hex(rounds);
    puts_com1("\n");
    (void)vcpu;
    return 0;
}
