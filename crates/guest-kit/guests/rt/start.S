/* Entry of every C guest: the host enters at CPL 3 with rdi = vCPU index, rsi = the
   parameter and a 16-byte aligned stack, which is what a call expects. The value
   guest_main returns becomes the debug-exit code. */
    .section .entry, "ax"
    .code64
    .globl _start
_start:
    call    guest_main
    out     %eax, $DEBUG_EXIT_PORT
1:
    jmp     1b
