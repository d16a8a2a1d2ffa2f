/* 16-bit real mode: writes "real mode\n" to COM1 and exits with code 0x42. */
    .code16
    .globl _start
_start:
    xor     %ax, %ax
    mov     %ax, %ds
    mov     $msg, %si
1:
    lodsb
    test    %al, %al
    jz      2f
    mov     $COM1_PORT, %dx
    out     %al, %dx
    jmp     1b
2:
    mov     $0x42, %eax
    out     %eax, $DEBUG_EXIT_PORT
    jmp     2b
msg:
    .asciz  "real mode\n"
