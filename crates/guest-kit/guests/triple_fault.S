/* Executes an invalid opcode with no IDT: #UD cannot be delivered, which escalates to
 * a triple fault. */
    .code64
    .globl _start
_start:
    ud2
