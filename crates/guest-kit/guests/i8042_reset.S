/* Resets the machine through the i8042 controller, like Linux's reboot=k. */
    .code64
    .globl _start
_start:
    mov     $0xfe, %al
    out     %al, $I8042_COMMAND_PORT
    jmp     _start
