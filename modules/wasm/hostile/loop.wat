;; An infinite loop in `run`, no host call at all: only the fuel limit (or the
;; deadline, if the host also interrupts a running module) can end it.
(module
  (import "imn" "clock_mono_ns" (func $clock_mono_ns (result i64)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (loop $forever
      (br $forever))
    (i32.const 0)))
