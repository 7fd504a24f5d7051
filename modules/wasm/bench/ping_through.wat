;; The benchmark's WebAssembly twin of the built-in ping: it hands its own parameters
;; to the host's `ping` call (the agent's shared ICMP engine) and emits the engine's
;; result as its own. `imn-bench wasm` runs it against `ping_module` with the same
;; parameters, to measure what the sandbox adds to a measurement.
(module
  (import "imn" "params" (func $params (param i32 i32) (result i32)))
  (import "imn" "ping" (func $ping (param i32 i32 i32 i32) (result i32)))
  (import "imn" "result" (func $result (param i32 i32) (result i32)))
  ;; 0..64 KiB: the parameters; 64..192 KiB: the engine's result.
  (memory (export "memory") 3)
  (func (export "run") (result i32)
    (local $n i32)
    (local $m i32)
    (local.set $n (call $params (i32.const 0) (i32.const 65536)))
    (if (i32.gt_u (local.get $n) (i32.const 65536)) (then (return (i32.const 2))))
    (local.set $m
      (call $ping (i32.const 0) (local.get $n) (i32.const 65536) (i32.const 131072)))
    (if (i32.lt_s (local.get $m) (i32.const 0)) (then (return (i32.const 3))))
    (if (i32.lt_s (call $result (i32.const 65536) (local.get $m)) (i32.const 0))
      (then (return (i32.const 4))))
    (i32.const 0)))
