/* The C test-guest runtime: port and MMIO access, barriers, COM1 output. Guests do
   their work (guest_main) at CPL 3 with IOPL 3 on identity-mapped, user-accessible
   memory; a guest entered at CPL 0 first runs kernel_init in kernel mode. */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u16 mmio_read16(u64 addr) { return *(volatile u16 *)addr; }
static inline void mmio_write16(u64 addr, u16 v) { *(volatile u16 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline void mmio_write64(u64 addr, u64 v) { *(volatile u64 *)addr = v; }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

/* Where the load generators record each operation's latency in TSC ticks (65536
   slots). */
#define LATENCIES ((u64)GUEST_HEAP + 0x80000)

/* xorshift64, for random offsets. */
static inline u64 xorshift(u64 *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Compiler barrier; with x86's ordering this is enough between normal stores. */
#define barrier() __asm__ volatile("" ::: "memory")
/* Full fence: orders a store before a later load (event-index checks). */
#define mb() __asm__ volatile("mfence" ::: "memory")

#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* The current privilege level (0 in kernel_init, 3 in guest_main). */
static inline u32 cpl(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* Kernel-mode start-up of a guest entered at CPL 0; the runtime's default does
   nothing. */
void kernel_init(u64 vcpu, u64 param);
u32 guest_main(u64 vcpu, u64 param);

void *memset(void *dst, int c, unsigned long n);
void *memcpy(void *dst, const void *src, unsigned long n);
int memcmp(const void *a, const void *b, unsigned long n);
void puts_com1(const char *s);
void put_hex(u64 v);

/* The disk check guests' shared parts (blkcheck, pvcheck, ata_bench's check rounds):
   word i of page s in round r of a pattern named by `salt` (a 64-bit mix, so every
   round, page and word differs), and the "round <r> ok\n" line after a round. */
u32 check_word(u64 salt, u64 r, u64 s, u64 i);
void put_round_ok(u64 r);

#endif
