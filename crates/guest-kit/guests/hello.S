/* The demo guest: greets through the 16550 (every byte trapped and emulated, after
 * polling the line status register like a real driver), then exits with code 0. */
    .code64
    .globl _start
_start:
    lea     msg(%rip), %rsi
next:
    movb    (%rsi), %bl
    test    %bl, %bl
    jz      done
    mov     $(COM1_PORT + 5), %dx
wait_thre:
    in      %dx, %al
    test    $0x20, %al
    jz      wait_thre
    mov     $COM1_PORT, %dx
    mov     %bl, %al
    out     %al, %dx
    inc     %rsi
    jmp     next
done:
    xor     %eax, %eax
    out     %eax, $DEBUG_EXIT_PORT
    jmp     done
msg:
    .asciz  "Hello from a vmcraft guest! I run at CPL 3 in long mode; every byte you read crossed the emulated 16550.\n"
