/* Rewrites and checks guest memory, for snapshot and migration tests: `rounds` rounds
   (parameter bits 16..47) over `mib` MiB from 16 MiB (bits 0..15). Round r writes
   each 8-byte word i of the span as memcheck_word(r, i), then reads the whole span
   back, checks every word and sums them. After each round it prints
   "round <r> sum <sum>\n" on COM1 (the same in every run), and "memcheck done\n" at
   the end, then exits 0. A word that does not read back prints
   "mismatch at <address>\n" and exits 1. */
#include "guest.h"

#define BASE 0x1000000ul

/* splitmix64 of (round, index): what word `i` holds in round `r`. */
static u64 memcheck_word(u64 r, u64 i)
{
    u64 x = (r << 40) ^ i ^ 0x9e3779b97f4a7c15ul;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ul;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebul;
    return x ^ (x >> 31);
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    u64 mib = param & 0xffff;
    u64 rounds = (param >> 16) & 0xffffffff;
    u64 words = mib << 17;
    volatile u64 *m = (volatile u64 *)BASE;
    for (u64 r = 0; r < rounds; r++) {
        for (u64 i = 0; i < words; i++)
            m[i] = memcheck_word(r, i);
        u64 sum = 0;
        for (u64 i = 0; i < words; i++) {
            u64 v = m[i];
            if (v != memcheck_word(r, i)) {
                puts_com1("mismatch at ");
                put_hex(BASE + 8 * i);
                puts_com1("\n");
                return 1;
            }
            sum += v;
        }
        puts_com1("round ");
        put_hex(r);
        puts_com1(" sum ");
        put_hex(sum);
        puts_com1("\n");
    }
    puts_com1("memcheck done\n");
    return 0;
}
