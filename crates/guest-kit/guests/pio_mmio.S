/* Port and MMIO accesses of every width, plus string I/O, against the test device.
 * Writes: fixed values the host checks. Reads: the device answers byte i of a w-byte
 * read with 0x10*w + i + 1, which the guest checks. Exit code 0 when every read
 * matched, otherwise the number of the first failing check. */
    .code64
    .globl _start
#define CHECK(n) mov $n, %ecx; jne fail
_start:
    mov     $TEST_PORT, %dx
    mov     $0x11, %al
    out     %al, %dx
    mov     $0x2233, %ax
    out     %ax, %dx
    mov     $0x44556677, %eax
    out     %eax, %dx
    in      %dx, %al
    cmp     $0x11, %al
    CHECK(1)
    in      %dx, %ax
    cmp     $0x2221, %ax
    CHECK(2)
    in      %dx, %eax
    cmp     $0x44434241, %eax
    CHECK(3)
    /* string I/O: four bytes out, three bytes in, to the next port */
    inc     %dx
    lea     outstr(%rip), %rsi
    mov     $4, %ecx
    rep outsb
    lea     inbuf(%rip), %rdi
    mov     $3, %ecx
    rep insb
    cmpl    $0x00111111, inbuf(%rip)
    CHECK(4)
    /* MMIO */
    mov     $TEST_MMIO, %ebx
    movb    $0x11, (%rbx)
    movw    $0x2233, 2(%rbx)
    movl    $0x44556677, 4(%rbx)
    mov     $0x8899aabbccddeeff, %rax
    mov     %rax, 8(%rbx)
    movb    (%rbx), %al
    cmp     $0x11, %al
    CHECK(5)
    movw    2(%rbx), %ax
    cmp     $0x2221, %ax
    CHECK(6)
    movl    4(%rbx), %eax
    cmp     $0x44434241, %eax
    CHECK(7)
    mov     8(%rbx), %rax
    mov     $0x8887868584838281, %rcx
    cmp     %rcx, %rax
    CHECK(8)
    xor     %ecx, %ecx
fail:
    mov     %ecx, %eax
    out     %eax, $DEBUG_EXIT_PORT
    jmp     fail
outstr:
    .ascii  "rep!"
    .balign 8
inbuf:
    .quad   0
