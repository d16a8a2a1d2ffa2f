/* Drives the emulated ATA disk (primary channel, 0x1f0) as an unmodified guest's
   driver would: task-file registers, status polling and `rep insw`/`rep outsw` on the
   16-bit data port. `count` operations of 4 KiB (8 sectors), reads or writes,
   sequential or random over the first 16 MiB; each operation's latency in TSC ticks
   goes to LATENCIES[i]. Parameter: bit 0 write, bit 1 random, bit 2 verify (write a
   pattern, read it back, compare; count ignored), bit 3 check rounds (for snapshot and
   migration tests: round r writes two operations of check_word(SALT, r, op, i) at
   sectors 16 * (r % 4) on, reads them back into other pages and compares, printing
   "round <r> ok\n" on COM1; "atacheck done\n" after the last, "mismatch <r>\n" and
   exit 3 for data that did not come back), bits 16..47 count (of rounds with bit 3).
   Exits 0 on success. */
#include "guest.h"

/* The pattern check_word makes for this guest. */
#define SALT 0x6a09e667f3bcc908ul

#define ATA 0x1f0
#define ATA_STATUS_BSY 0x80
#define ATA_STATUS_DRQ 0x08
#define ATA_STATUS_ERR 0x01
#define BUF ((u64)GUEST_HEAP)
#define DISK_SECTORS (16u << 11)

static inline u16 inw(u16 port)
{
    u16 v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static int wait_ready(int want_drq)
{
    for (;;) {
        u8 s = inb(ATA + 7);
        if (s & ATA_STATUS_ERR)
            return -1;
        if (s & ATA_STATUS_BSY)
            continue;
        if (!want_drq || (s & ATA_STATUS_DRQ))
            return 0;
    }
}

static int ata_io(int write, u32 lba, u64 buf)
{
    if (wait_ready(0))
        return -1;
    outb(ATA + 2, 8);
    outb(ATA + 3, (u8)lba);
    outb(ATA + 4, (u8)(lba >> 8));
    outb(ATA + 5, (u8)(lba >> 16));
    outb(ATA + 6, 0xe0 | ((lba >> 24) & 0x0f));
    outb(ATA + 7, write ? 0x30 : 0x20);
    for (int s = 0; s < 8; s++) {
        if (wait_ready(1))
            return -1;
        u64 p = buf + 512 * (u64)s;
        u64 n = 256;
        if (write)
            __asm__ volatile("rep outsw" : "+S"(p), "+c"(n) : "d"(ATA) : "memory");
        else
            __asm__ volatile("rep insw" : "+D"(p), "+c"(n) : "d"(ATA) : "memory");
    }
    return wait_ready(0);
}

static u32 check_rounds(u64 rounds)
{
    u64 out = BUF, in = BUF + 2 * 4096;
    for (u64 r = 0; r < rounds; r++) {
        for (u64 op = 0; op < 2; op++) {
            for (u64 i = 0; i < 1024; i++)
                ((volatile u32 *)(out + 4096 * op))[i] = check_word(SALT, r, op, i);
            if (ata_io(1, (u32)(16 * (r % 4) + 8 * op), out + 4096 * op))
                return 20;
        }
        memset((void *)in, 0, 2 * 4096);
        for (u64 op = 0; op < 2; op++)
            if (ata_io(0, (u32)(16 * (r % 4) + 8 * op), in + 4096 * op))
                return 21;
        if (memcmp((void *)out, (void *)in, 2 * 4096)) {
            puts_com1("mismatch ");
            put_hex(r);
            puts_com1("\n");
            return 3;
        }
        put_round_ok(r);
    }
    puts_com1("atacheck done\n");
    return 0;
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    int write = param & 1, random = param & 2;
    if (param & 8)
        return check_rounds((param >> 16) & 0xffffffff);
    if (param & 4) {
        for (u32 i = 0; i < 1024; i++)
            *(u32 *)(BUF + 4 * i) = i * 0x01000193u ^ 0xa7a;
        if (ata_io(1, 40, BUF))
            return 10;
        memset((void *)BUF, 0, 4096);
        if (ata_io(0, 40, BUF))
            return 11;
        for (u32 i = 0; i < 1024; i++)
            if (*(u32 *)(BUF + 4 * i) != (i * 0x01000193u ^ 0xa7a))
                return 12;
        /* A sector past the end must fail. */
        outb(ATA + 2, 1);
        outb(ATA + 3, 0);
        outb(ATA + 4, 0);
        outb(ATA + 5, 0);
        outb(ATA + 6, 0xef);
        outb(ATA + 7, 0x20);
        if (!(inb(ATA + 7) & ATA_STATUS_ERR))
            return 13;
        puts_com1("ata ok\n");
        return 0;
    }
    u64 count = (param >> 16) & 0xffffffff;
    u64 seed = 0x9e3779b97f4a7c15ul;
    for (u64 i = 0; i < count; i++) {
        u32 lba;
        if (random) {
            lba = (u32)(xorshift(&seed) % (DISK_SECTORS / 8)) * 8;
        } else {
            lba = (u32)(i * 8 % DISK_SECTORS);
        }
        u64 t0 = rdtsc();
        if (ata_io(write, lba, BUF))
            return 20;
        ((volatile u64 *)LATENCIES)[i % 65536] = rdtsc() - t0;
    }
    return 0;
}
