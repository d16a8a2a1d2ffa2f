/* Reads 4 bytes from the port given in rsi and exits with them as its code. */
    .code64
    .globl _start
_start:
    mov     %esi, %edx
    in      %dx, %eax
    out     %eax, $DEBUG_EXIT_PORT
    jmp     _start
