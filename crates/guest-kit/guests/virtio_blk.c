/* Drives the virtio-blk device at VIRTIO_MMIO_BASE from CPL 3: negotiation, queue
   setup, writes and reads checked byte for byte, flush, get-id, an out-of-range read
   that must fail, and a batch of 16 requests behind one notification. Prints what it
   learns to COM1 and exits 0 when every check passed, else the failed step's code.
   Parameter bit 0: negotiate EVENT_IDX. Bit 1: afterwards write 64 KiB at sector 256
   (seed 7), flush, print "flushed" and spin without exiting, to be killed by a
   durability test. Bit 2: then tear the device down as virtio 1.2 §4.2.2.2 says
   (QueueReady 0 while DRIVER_OK is set, polled until it reads 0), reset it, bring it
   up again with the other EVENT_IDX choice, write sector 16 (seed 9), read it back,
   and print "re-initialised". Bit 3: then reset with 16 writes in flight, check the
   device leaves the old rings alone, bring it up again, round-trip sector 24 (seed
   11) and print "reset in flight ok". */
#include "guest.h"
#include "virtio_blk.h"

#define QSIZE 64
#define SLOTS 16
#define CHECK ((u64)GUEST_HEAP + 0x30000)

static struct virtq q;

static void submit(int slot, u32 type, u64 sector, u64 buf, u32 len)
{
    blk_submit(&q, slot, type, sector, buf, len);
}

/* One request, waited for; returns its status. */
static int request(u32 type, u64 sector, u64 buf, u32 len)
{
    u16 old = q.avail_idx;
    submit(0, type, sector, buf, len);
    virtq_kick(&q, old);
    virtq_wait(&q, 0);
    return *(volatile u8 *)STATUSES;
}

static void fill(u64 buf, u32 len, u32 seed)
{
    for (u32 i = 0; i < len; i += 4)
        *(u32 *)(buf + i) = seed * 2654435761u ^ i;
}

/* Publish SLOTS 4 KiB writes (patterns seed, seed + 1, ...) at `sector`, 8 sectors
   apart, behind one notification; does not wait for them. */
static void publish_writes(u64 sector, u32 seed)
{
    u16 old = q.avail_idx;
    for (int s = 0; s < SLOTS; s++) {
        u64 buf = DATA + 4096 * (u64)s;
        fill(buf, 4096, seed + s);
        submit(s, BLK_T_OUT, sector + 8 * (u64)s, buf, 4096);
    }
    virtq_kick(&q, old);
}

/* Write a 4 KiB pattern (seed) at `sector`, read it back and compare: 0 when right,
   else 1 (write failed), 2 (read failed) or 3 (different bytes). */
static int round_trip(u64 sector, u32 seed)
{
    fill(DATA, 4096, seed);
    if (request(BLK_T_OUT, sector, DATA, 4096) != BLK_S_OK)
        return 1;
    memset((void *)CHECK, 0, 4096);
    if (request(BLK_T_IN, sector, CHECK, 4096) != BLK_S_OK)
        return 2;
    return memcmp((void *)DATA, (void *)CHECK, 4096) ? 3 : 0;
}

u32 guest_main(u64 vcpu, u64 param)
{
    u64 base = VIRTIO_MMIO_BASE;
    int err = blk_init(&q, QSIZE, param & 1);
    if (err)
        return 100 - err;

    u64 capacity = vio_r(base, VIRTIO_CONFIG) | (u64)vio_r(base, VIRTIO_CONFIG + 4) << 32;
    puts_com1("capacity ");
    put_hex(capacity);
    puts_com1("\n");

    err = round_trip(8, 1);
    if (err)
        return 19 + err;
    if (request(BLK_T_FLUSH, 0, 0, 0) != BLK_S_OK)
        return 23;
    char id[21];
    memset(id, 0, sizeof id);
    if (request(BLK_T_GET_ID, 0, (u64)id, 20) != BLK_S_OK)
        return 24;
    puts_com1("id ");
    puts_com1(id);
    puts_com1("\n");
    if (request(BLK_T_IN, capacity, CHECK, 512) != BLK_S_IOERR)
        return 25;

    /* A batch: SLOTS writes behind one kick, then SLOTS reads behind one kick. */
    for (int pass = 0; pass < 2; pass++) {
        u16 old = q.avail_idx;
        for (int s = 0; s < SLOTS; s++) {
            u64 buf = (pass ? CHECK : DATA) + 4096 * (u64)s;
            if (!pass)
                fill(buf, 4096, 100 + s);
            submit(s, pass ? BLK_T_IN : BLK_T_OUT, 64 + 8 * (u64)s, buf, 4096);
        }
        virtq_kick(&q, old);
        for (int done = 0; done < SLOTS; done++)
            virtq_wait(&q, 0);
        for (int s = 0; s < SLOTS; s++)
            if (*(volatile u8 *)(STATUSES + s) != BLK_S_OK)
                return 26 + pass;
    }
    if (memcmp((void *)DATA, (void *)CHECK, 4096 * SLOTS))
        return 28;

    puts_com1("requests 38 notifications ");
    put_hex(q.notifications);
    puts_com1("\n");
    (void)vcpu;
    if (param & 4) {
        vio_w(base, VIRTIO_QUEUE_SEL, 0);
        vio_w(base, VIRTIO_QUEUE_READY, 0);
        int polls = 0;
        while (vio_r(base, VIRTIO_QUEUE_READY) && polls < 1000)
            polls++;
        if (polls == 1000)
            return 30;
        vio_w(base, VIRTIO_STATUS, 0);
        if (vio_r(base, VIRTIO_STATUS) != 0)
            return 31;
        err = blk_init(&q, QSIZE, !(param & 1));
        if (err)
            return 60 - err;
        err = round_trip(16, 9);
        if (err)
            return 31 + err;
        puts_com1("re-initialised\n");
    }
    if (param & 8) {
        /* Reset with I/O in flight: 16 writes published and notified, then a reset
           at once. After the status reads 0 the device must not touch the old rings
           (virtio 1.2 §2.4.1): the used index stays put while the guest spins. Then
           the device comes up again and works. */
        publish_writes(512, 200);
        vio_w(base, VIRTIO_STATUS, 0);
        if (vio_r(base, VIRTIO_STATUS) != 0)
            return 35;
        u16 used_at_reset = q.used[1];
        for (volatile int spin = 0; spin < 2000000; spin++)
            ;
        if (q.used[1] != used_at_reset)
            return 36;
        err = blk_init(&q, QSIZE, param & 1);
        if (err)
            return 60 - err;
        err = round_trip(24, 11);
        if (err)
            return 36 + err;
        puts_com1("reset in flight ok\n");
    }
    if (!(param & 2))
        return 0;

    publish_writes(256, 7);
    for (int done = 0; done < SLOTS; done++)
        virtq_wait(&q, 0);
    if (request(BLK_T_FLUSH, 0, 0, 0) != BLK_S_OK)
        return 29;
    puts_com1("flushed\n");
    for (;;)
        __asm__ volatile("pause");
}
