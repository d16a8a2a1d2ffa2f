/* Finds the vmcraft interface through CPUID in kernel mode, as a real kernel does,
   then makes hypercalls from CPL 3 with Xen's x86-64 convention (rax; rdi, rsi, rdx,
   r10, r8; result in rax).

   Discovery runs in kernel_init, at CPL 0: there CPUID reaches the hypervisor on
   every host, while at CPL 3 it is intercepted only on hardware-assisted KVM or where
   the host has CPUID faulting. It scans the hypervisor range from 0x40000000 in steps
   of 0x100 for the signature "vmcraftvmcra" (Linux's scan), then reads the hypercall
   port from the next leaf.

   The host's table for this test: 1 = sum of the five arguments, 2 = copy 8 bytes
   from the guest address in rdi to the one in rsi (-EFAULT outside memory), 3 = echo
   rdi if <= 100 (-EINVAL otherwise). Exits 0 when every answer is right, else the
   failed step: 9 discovery did not run at CPL 0, 10 no vmcraft signature, 11 the
   leaf after it does not name HYPERCALL_PORT, 12 guest_main is not at CPL 3. */
#include "guest.h"
#include "xen.h"

static u32 discovery_cpl = 0xff, base, max_leaf, port;

void kernel_init(u64 vcpu, u64 param)
{
    (void)vcpu;
    (void)param;
    discovery_cpl = cpl();
    for (u32 leaf = 0x40000000; leaf < 0x40010000; leaf += 0x100) {
        u32 a, b, c, d;
        cpuid(leaf, &a, &b, &c, &d);
        char sig[12];
        memcpy(sig, &b, 4);
        memcpy(sig + 4, &c, 4);
        memcpy(sig + 8, &d, 4);
        if (!memcmp(sig, "vmcraftvmcra", 12)) {
            base = leaf;
            max_leaf = a;
            break;
        }
    }
    if (base && max_leaf >= base + 1) {
        u32 a, b, c, d;
        cpuid(base + 1, &a, &b, &c, &d);
        port = b;
    }
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    (void)param;
    if (discovery_cpl != 0)
        return 9;
    if (!base || max_leaf < base + 1)
        return 10;
    if (port != HYPERCALL_PORT)
        return 11;
    if (cpl() != 3)
        return 12;

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
