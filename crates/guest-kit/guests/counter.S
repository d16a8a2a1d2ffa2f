/* Spins forever at CPL 3 incrementing its own progress counter at
 * COUNTER_BASE + 64 * vcpu_index (rdi); never exits to the VMM. */
    .code64
    .globl _start
_start:
    shl     $6, %rdi
    lea     COUNTER_BASE(%rdi), %rbx
1:
    incq    (%rbx)
    jmp     1b
