/* Dirties guest memory at a steady rate, for migration benchmarks. Parameter: bits
   0..23 the rate in pages per second (0: none), bits 24..39 the span in MiB from
   16 MiB, bits 40..63 the TSC frequency in MHz (the host knows it). It first writes
   every page of the span (so all of it must be copied), prints "filled" on COM1, then
   writes one 8-byte word into the next page of the span each 1/rate of a second,
   forever. */
#include "guest.h"

#define BASE 0x1000000ul

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    u64 rate = param & 0xffffff;
    u64 pages = ((param >> 24) & 0xffff) << 8;
    u64 mhz = param >> 40;
    volatile u64 *m = (volatile u64 *)BASE;
    for (u64 p = 0; p < pages; p++)
        m[p * 512] = p + 1;
    puts_com1("filled\n");
    if (rate == 0 || pages == 0)
        for (;;)
            __asm__ volatile("pause");
    u64 interval = mhz * 1000000ul / rate;
    u64 next = rdtsc(), p = 0, n = 1;
    for (;;) {
        while (rdtsc() < next)
            __asm__ volatile("pause");
        m[(p % pages) * 512 + 1] = n++;
        p++;
        next += interval;
    }
}
