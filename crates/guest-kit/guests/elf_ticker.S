/* An ELF "kernel" that counts, for snapshots taken through a VMM's API: entered like
 * elf_reset (long mode, CPL 0, interrupts off), it writes "tick N" to COM1 (N in eight
 * hex digits, from 1, one more each time) every 256 polls of the i8042's status, and
 * reads each scancode as elf_ctrl_alt_del does: once Ctrl+Alt+Del comes it writes
 * "cad" and resets the machine through the i8042. The count lives in a register, the
 * program in guest memory: a machine restored from a snapshot goes on counting from
 * where it was saved, one that starts afresh begins at 1 again. */
    .code64
    .globl _start
_start:
    xor     %r12d, %r12d            /* the count */
    xor     %ebx, %ebx              /* bit 0 Ctrl, bit 1 Alt, bit 2 an 0xe0 prefix */
tick:
    inc     %r12
    mov     $COM1_PORT, %dx
    mov     $'t', %al
    out     %al, %dx
    mov     $'i', %al
    out     %al, %dx
    mov     $'c', %al
    out     %al, %dx
    mov     $'k', %al
    out     %al, %dx
    mov     $' ', %al
    out     %al, %dx
    mov     $28, %ecx               /* the shift of the highest of eight digits */
1:  mov     %r12, %rax
    shr     %cl, %rax
    and     $0xf, %al
    add     $'0', %al
    cmp     $'9', %al
    jbe     2f
    add     $7, %al                 /* 'A'..'F' */
2:  out     %al, %dx
    sub     $4, %ecx
    jns     1b
    mov     $0x0a, %al
    out     %al, %dx
    mov     $256, %r13d
poll:
    dec     %r13d
    jz      tick
    in      $I8042_COMMAND_PORT, %al
    test    $1, %al                 /* output buffer full */
    jz      poll
    in      $0x60, %al              /* the data port */
    cmp     $0x1d, %al
    jne     3f
    or      $1, %bl
    jmp     poll
3:  cmp     $0x38, %al
    jne     4f
    or      $2, %bl
    jmp     poll
4:  cmp     $0xe0, %al
    jne     5f
    or      $4, %bl
    jmp     poll
5:  cmp     $0x53, %al
    jne     6f
    mov     %bl, %cl
    and     $7, %cl
    cmp     $7, %cl
    je      7f
6:  and     $3, %bl                 /* the prefix covers one byte only */
    jmp     poll
7:  mov     $COM1_PORT, %dx
    mov     $'c', %al
    out     %al, %dx
    mov     $'a', %al
    out     %al, %dx
    mov     $'d', %al
    out     %al, %dx
8:  mov     $0xfe, %al
    out     %al, $I8042_COMMAND_PORT
    hlt
    jmp     8b
