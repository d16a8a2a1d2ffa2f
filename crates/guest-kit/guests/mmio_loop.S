/* rsi iterations of one 4-byte MMIO write to the test device, then exit code 0. */
    .code64
    .globl _start
_start:
    mov     $TEST_MMIO, %ebx
1:
    movl    %esi, (%rbx)
    dec     %rsi
    jnz     1b
    xor     %eax, %eax
    out     %eax, $DEBUG_EXIT_PORT
