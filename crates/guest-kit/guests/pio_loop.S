/* rsi iterations of one port write to the test device, then exit code 0. */
    .code64
    .globl _start
_start:
    mov     $TEST_PORT, %dx
1:
    out     %al, %dx
    dec     %rsi
    jnz     1b
    xor     %eax, %eax
    out     %eax, $DEBUG_EXIT_PORT
