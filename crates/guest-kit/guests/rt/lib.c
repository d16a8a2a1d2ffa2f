/* What gcc may call even in a freestanding build, and the runtime's defaults. */
#include "guest.h"

/* The kernel-mode start-up of a guest entered at CPL 0 (see start.S); a guest that
   has work to do there defines its own. */
__attribute__((weak)) void kernel_init(u64 vcpu, u64 param)
{
    (void)vcpu;
    (void)param;
}

void *memset(void *dst, int c, unsigned long n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

void *memcpy(void *dst, const void *src, unsigned long n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

/* Overlapping copies (Rust's ptr::copy): forwards when the destination is below the
   source, backwards otherwise. */
void *memmove(void *dst, const void *src, unsigned long n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d <= s) {
        while (n--)
            *d++ = *s++;
    } else {
        while (n--)
            d[n] = s[n];
    }
    return dst;
}

int memcmp(const void *a, const void *b, unsigned long n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

void puts_com1(const char *s)
{
    for (; *s; s++)
        outb(COM1_PORT, (u8)*s);
}

void put_hex(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    char buf[19] = "0x";
    for (int i = 0; i < 16; i++)
        buf[2 + i] = digits[(v >> (60 - 4 * i)) & 0xf];
    buf[18] = 0;
    puts_com1(buf);
}

u32 check_word(u64 salt, u64 r, u64 s, u64 i)
{
    u64 x = (r << 32) ^ (s << 16) ^ i ^ salt;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ul;
    return (u32)(x ^ (x >> 31));
}

void put_round_ok(u64 r)
{
    puts_com1("round ");
    put_hex(r);
    puts_com1(" ok\n");
}

/* Rust's core calls bcmp for slice equality. */
int bcmp(const void *a, const void *b, unsigned long n)
{
    return memcmp(a, b, n);
}

/* Referenced by the unwind tables of the host target's precompiled core; Rust guests
   are built with panic=abort and never unwind. */
void rust_eh_personality(void) {}
