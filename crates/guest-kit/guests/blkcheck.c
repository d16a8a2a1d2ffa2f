/* Keeps virtio-blk requests in flight, for snapshot and migration tests: `rounds`
   rounds (parameter bits 16..47; bit 0 negotiates EVENT_IDX). Round r writes 16 pages
   in one batch behind one notification (page s at sector 8 * (s + 16 * (r % 4)), each
   filled from check_word(SALT, r, s, i)), waits for them, then reads them back in one
   batch into other pages and checks every byte. Prints "round <r> ok\n" on COM1 after
   each, "blkcheck done\n" at the end and exits 0; a failed request prints
   "status <round> <slot>" and exits 2, a page that reads back wrong prints
   "mismatch <round> <slot>" and exits 3. */
#include "guest.h"
#include "virtio_blk.h"

/* The pattern check_word makes for this guest. */
#define SALT 0x9e3779b97f4a7c15ul

#define QSIZE 64
#define SLOTS 16
#define OUT ((u64)DATA)
#define IN ((u64)DATA + SLOTS * 4096ul)

static struct virtq q;

/* One batch: SLOTS requests of `type` at round r's sectors into or out of `base`. */
static int batch(u32 type, u64 r, u64 base)
{
    u16 old = q.avail_idx;
    for (int s = 0; s < SLOTS; s++)
        blk_submit(&q, s, type, 8 * (s + SLOTS * (r % 4)), base + 4096ul * s, 4096);
    virtq_kick(&q, old);
    for (int s = 0; s < SLOTS; s++)
        virtq_wait(&q, 0);
    for (int s = 0; s < SLOTS; s++)
        if (blk_status(s) != BLK_S_OK) {
            puts_com1("status ");
            put_hex(r);
            puts_com1(" ");
            put_hex(s);
            puts_com1("\n");
            return 2;
        }
    return 0;
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    u64 rounds = (param >> 16) & 0xffffffff;
    int err = blk_init(&q, QSIZE, param & 1);
    if (err)
        return 100 - err;
    for (u64 r = 0; r < rounds; r++) {
        for (u64 s = 0; s < SLOTS; s++)
            for (u64 i = 0; i < 1024; i++)
                ((volatile u32 *)(OUT + 4096 * s))[i] = check_word(SALT, r, s, i);
        if ((err = batch(BLK_T_OUT, r, OUT)))
            return err;
        memset((void *)IN, 0, SLOTS * 4096);
        if ((err = batch(BLK_T_IN, r, IN)))
            return err;
        for (int s = 0; s < SLOTS; s++)
            if (memcmp((void *)(OUT + 4096ul * s), (void *)(IN + 4096ul * s), 4096)) {
                puts_com1("mismatch ");
                put_hex(r);
                puts_com1(" ");
                put_hex(s);
                puts_com1("\n");
                return 3;
            }
        put_round_ok(r);
    }
    puts_com1("blkcheck done\n");
    return 0;
}
