;; Asks for 1 GiB more memory at once (16384 pages of 64 KiB). A host that enforces the
;; manifest's memory_pages makes memory.grow return -1: the module then traps
;; (unreachable). Should the grow succeed, the module writes the new memory's last byte
;; (so the pages are really touched) and returns 0.
(module
  (import "imn" "log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $old i32)
    (local.set $old (memory.grow (i32.const 16384)))
    (if (i32.eq (local.get $old) (i32.const -1))
      (then (unreachable)))
    ;; The last byte: (old pages + 16384) * 65536 - 1.
    (i32.store8
      (i32.sub
        (i32.mul
          (i32.add (local.get $old) (i32.const 16384))
          (i32.const 65536))
        (i32.const 1))
      (i32.const 0xff))
    (i32.const 0)))
