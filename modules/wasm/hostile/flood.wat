;; Opens a UDP socket to 127.0.0.1 port 9 (discard) and sends a 1400-byte datagram in an
;; endless loop, ignoring what send returns: the host's bytes_sent (or packets_sent)
;; limit must end the run. Returns 2 if the socket cannot be opened at all.
(module
  (import "imn" "udp_open" (func $udp_open (param i32 i32 i32) (result i32)))
  (import "imn" "send" (func $send (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "127.0.0.1")
  ;; The payload: 1400 bytes from offset 1024 (zeros but the first few).
  (data (i32.const 1024) "IMN hostile flood")
  (func (export "run") (result i32)
    (local $h i32)
    (local.set $h
      (call $udp_open (i32.const 16) (i32.const 9) (i32.const 9)))
    (if (i32.lt_s (local.get $h) (i32.const 0))
      (then (return (i32.const 2))))
    (loop $again
      (drop (call $send (local.get $h) (i32.const 1024) (i32.const 1400)))
      (br $again))
    (i32.const 0)))
