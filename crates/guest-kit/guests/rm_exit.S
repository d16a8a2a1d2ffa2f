/* 16-bit real mode, the smallest useful guest, for start-up measurements: its first
   exit writes a newline to COM1, its second exits through the debug-exit port with
   code 0. Position independent and under 16 bytes, so it also fits at the x86 reset
   vector (F000:FFF0) of a firmware image. */
    .code16
    .globl _start
_start:
    mov     $0x0a, %al
    mov     $COM1_PORT, %dx
    out     %al, %dx
    xor     %ax, %ax
    out     %al, $DEBUG_EXIT_PORT
1:
    hlt
    jmp     1b
