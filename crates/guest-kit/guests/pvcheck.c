/* Keeps PV block requests in flight, for snapshot and migration tests: `rounds`
   rounds (parameter bits 16..47). Round r writes 8 granted pages in one batch behind
   one event-channel notification (page s at sector 8 * (s + 8 * (r % 4)), filled
   from check_word(SALT, r, s, i)), waits for the responses, then reads them back
   into 8 other granted pages in one batch and checks every byte. Prints "round <r> ok\n"
   on COM1 after each, "pvcheck done\n" at the end, and exits 0; a failed request
   prints "status <round> <slot>" and exits 2, data that did not come back prints
   "mismatch <round> <slot>" and exits 3. */
#include "guest.h"
#include "xen.h"

/* The pattern check_word makes for this guest. */
#define SALT 0x243f6a8885a308d3ul

#define SLOTS 8
#define OUT ((u64)GUEST_HEAP)
#define IN ((u64)GUEST_HEAP + SLOTS * 4096ul)

static struct blk_front f;

static void report(const char *what, u64 r, u64 s)
{
    puts_com1(what);
    put_hex(r);
    puts_com1(" ");
    put_hex(s);
    puts_com1("\n");
}

/* One batch of SLOTS requests of `op` for round r through grants `gref0`.. */
static int batch(u8 op, u64 r, u32 gref0)
{
    for (u32 s = 0; s < SLOTS; s++) {
        struct blkif_request *q = blk_slot(&f, f.req_prod_pvt);
        memset(q, 0, sizeof *q);
        q->operation = op;
        q->nr_segments = 1;
        q->id = s;
        q->sector_number = 8 * (s + SLOTS * (r % 4));
        q->seg[0].gref = gref0 + s;
        q->seg[0].first_sect = 0;
        q->seg[0].last_sect = 7;
        f.req_prod_pvt++;
    }
    blk_push(&f);
    for (u32 s = 0; s < SLOTS; s++)
        if (blk_wait(&f) != 0) {
            report("status ", r, s);
            return 2;
        }
    return 0;
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    u64 rounds = (param >> 16) & 0xffffffff;
    int err;
    blk_front_init(&f);
    for (u32 s = 0; s < SLOTS; s++) {
        grant_access(s, OUT + 4096ul * s, 1);
        grant_access(SLOTS + s, IN + 4096ul * s, 0);
    }
    for (u64 r = 0; r < rounds; r++) {
        for (u64 s = 0; s < SLOTS; s++)
            for (u64 i = 0; i < 1024; i++)
                ((volatile u32 *)(OUT + 4096 * s))[i] = check_word(SALT, r, s, i);
        if ((err = batch(BLKIF_OP_WRITE, r, 0)))
            return err;
        memset((void *)IN, 0, SLOTS * 4096);
        if ((err = batch(BLKIF_OP_READ, r, SLOTS)))
            return err;
        for (u64 s = 0; s < SLOTS; s++)
            if (memcmp((void *)(OUT + 4096 * s), (void *)(IN + 4096 * s), 4096)) {
                report("mismatch ", r, s);
                return 3;
            }
        put_round_ok(r);
    }
    puts_com1("pvcheck done\n");
    return 0;
}
