/* Entry of every C and Rust guest. The host enters with rdi = vCPU index, rsi = the
   parameter and a 16-byte aligned stack, which is what a call expects.

   Entered at CPL 3 (GuestMode::User64), it calls guest_main at once. Entered at CPL 0
   (GuestMode::Kernel64), it first calls kernel_init(vcpu, param) in kernel mode, where
   CPUID, RDMSR and the other privileged or intercepted instructions reach the
   hypervisor on every host, then drops to CPL 3 with IOPL 3 through an IRET frame
   and calls guest_main on the same stack. The value guest_main returns becomes the
   debug-exit code. */
    .section .entry, "ax"
    .code64
    .globl _start
_start:
    mov     %cs, %eax
    test    $3, %eax
    jnz     .Luser
    mov     %rdi, %r12
    mov     %rsi, %r13
    mov     %rsp, %r14
    call    kernel_init
    mov     %r12, %rdi
    mov     %r13, %rsi
    pushq   $USER_DATA_SELECTOR     /* ss */
    pushq   %r14                    /* rsp: the stack as the host gave it */
    pushq   $0x3002                 /* rflags: IOPL 3, the reserved bit */
    pushq   $USER_CODE_SELECTOR     /* cs */
    lea     .Luser(%rip), %rax
    pushq   %rax                    /* rip */
    iretq
.Luser:
    call    guest_main
    out     %eax, $DEBUG_EXIT_PORT
1:
    jmp     1b
