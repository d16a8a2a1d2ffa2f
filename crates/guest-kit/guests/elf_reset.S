/* The smallest "kernel" another VMM boots the way vmcraft does: an ELF linked at 1 MiB,
 * entered in long mode at CPL 0 as the Linux 64-bit boot protocol enters a vmlinux
 * (Firecracker, vmcraft's --kernel). Its first exit writes a newline to COM1; its
 * second resets the machine through the i8042, which ends the VMM process. */
    .code64
    .globl _start
_start:
    mov     $0x0a, %al
    mov     $COM1_PORT, %dx
    out     %al, %dx
1:  mov     $0xfe, %al
    out     %al, $I8042_COMMAND_PORT
    hlt
    jmp     1b
