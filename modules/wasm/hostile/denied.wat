;; Connects over TCP to the literal address 127.0.0.9, port 9, timeout 1000 ms, which
;; the test's policy denies (127.0.0.9/32): the host must answer POLICY_DENIED (-1)
;; without opening a connection. Returns 1 whatever happens, so the run fails and the
;; host's report names the last host error.
(module
  (import "imn" "tcp_connect"
    (func $tcp_connect (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "127.0.0.9")
  (func (export "run") (result i32)
    (drop
      (call $tcp_connect
        (i32.const 16)     ;; host_ptr
        (i32.const 9)      ;; host_len: "127.0.0.9"
        (i32.const 9)      ;; port
        (i32.const 1000))) ;; timeout_ms
    (i32.const 1)))
