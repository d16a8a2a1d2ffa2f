/* Finds the vmcraft interface through CPUID and makes hypercalls from CPL 3, with
   Xen's x86-64 convention (rax; rdi, rsi, rdx, r10, r8; result in rax). The host's
   table for this test: 1 = sum of the five arguments, 2 = copy 8 bytes from the guest
   address in rdi to the one in rsi (-EFAULT outside memory), 3 = echo rdi if <= 100
   (-EINVAL otherwise). Exits 0 when every answer is right, else the failed step. */
#include "guest.h"
#include "xen.h"

static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    (void)param;
    u32 a, b, c, d;
    cpuid(0x40000000, &a, &b, &c, &d);
    char sig[13];
    memcpy(sig, &b, 4);
    memcpy(sig + 4, &c, 4);
    memcpy(sig + 8, &d, 4);
    sig[12] = 0;
    if (memcmp(sig, "vmcraftvmcra", 12) || a < 0x40000001)
        return 10;
    cpuid(0x40000001, &a, &b, &c, &d);
    if (b != HYPERCALL_PORT)
        return 11;

    if (hypercall(1, 1, 2, 3, 4, 5) != 15)
        return 20;
    static u64 src = 0x1122334455667788ul, dst;
    if (hypercall(2, (u64)&src, (u64)&dst, 0, 0, 0) != 8 || dst != src)
        return 21;
    if (hypercall(2, 1ul << 45, (u64)&dst, 0, 0, 0) != -14) /* -EFAULT */
        return 22;
    if (hypercall(3, 100, 0, 0, 0, 0) != 100 || hypercall(3, 101, 0, 0, 0, 0) != -22)
        return 23;
    if (hypercall(77, 0, 0, 0, 0, 0) != -38) /* -ENOSYS */
        return 24;
    puts_com1("hypercalls ok\n");
    return 0;
}
