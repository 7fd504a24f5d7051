;; A trap in the middle of a run: logs "before trap" (level info), reads the monotonic
;; clock, then divides the clock reading by zero (i64.div_s traps). The host must report
;; the run as failed by a trap, with the log line kept.
(module
  (import "imn" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "imn" "clock_mono_ns" (func $clock_mono_ns (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 16) "before trap")
  (func (export "run") (result i32)
    (drop (call $log (i32.const 1) (i32.const 16) (i32.const 11)))
    (drop
      (i64.div_s
        (call $clock_mono_ns)
        (i64.const 0)))
    (i32.const 0)))
