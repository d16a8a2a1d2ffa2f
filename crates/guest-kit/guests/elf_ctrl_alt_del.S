/* An ELF "kernel" that waits for Ctrl+Alt+Del on the i8042 keyboard, as Linux's
 * keyboard driver does with `reboot=k`: entered like elf_reset (long mode, CPL 0,
 * interrupts off), it writes a newline to COM1, then polls the controller's status
 * and reads each scancode (set 1, the controller translating). Once Ctrl (0x1d) and
 * Alt (0x38) are down and Delete (0xe0 0x53) comes, it writes "cad" to COM1 and resets
 * the machine through the i8042. Any other byte is skipped. */
    .code64
    .globl _start
_start:
    mov     $0x0a, %al
    mov     $COM1_PORT, %dx
    out     %al, %dx
    xor     %ebx, %ebx              /* bit 0 Ctrl, bit 1 Alt, bit 2 an 0xe0 prefix */
1:  in      $I8042_COMMAND_PORT, %al
    test    $1, %al                 /* output buffer full */
    jnz     2f
    pause
    jmp     1b
2:  in      $0x60, %al              /* the data port */
    cmp     $0x1d, %al
    jne     3f
    or      $1, %bl
    jmp     1b
3:  cmp     $0x38, %al
    jne     4f
    or      $2, %bl
    jmp     1b
4:  cmp     $0xe0, %al
    jne     5f
    or      $4, %bl
    jmp     1b
5:  cmp     $0x53, %al
    jne     6f
    mov     %bl, %cl
    and     $7, %cl
    cmp     $7, %cl
    je      7f
6:  and     $3, %bl                 /* the prefix covers one byte only */
    jmp     1b
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
