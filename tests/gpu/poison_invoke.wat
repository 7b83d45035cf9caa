;; A guest whose "poke" function launches the tenant PTX kernel "poke" (tests/gpu/poison_tenant.ptx)
;; with the raw address 16, then syncs: the store faults (CUDA_ERROR_ILLEGAL_ADDRESS) and poisons
;; the shard's CUDA context. Returns FAILED (-1) when a host call fails, so the host's error is reported.
(module
  (import "tensorwasm" "gpu_launch" (func $gpu_launch (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "tensorwasm" "gpu_sync" (func $gpu_sync (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 128) "poke")
  (func (export "tw_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "poke") (param i32 i32) (result i64)
    ;; grid (1, 1, 1), block (1, 1, 1) at 256
    (i32.store (i32.const 256) (i32.const 1))
    (i32.store (i32.const 260) (i32.const 1))
    (i32.store (i32.const 264) (i32.const 1))
    (i32.store (i32.const 268) (i32.const 1))
    (i32.store (i32.const 272) (i32.const 1))
    (i32.store (i32.const 276) (i32.const 1))
    ;; one argument at 512: kind u64 (4), value 16
    (i32.store (i32.const 512) (i32.const 4))
    (i32.store (i32.const 516) (i32.const 0))
    (i64.store (i32.const 520) (i64.const 16))
    (if (i32.lt_s (call $gpu_launch (i32.const 128) (i32.const 4) (i32.const 256) (i32.const 512)
                                    (i32.const 1) (i32.const 0))
                  (i32.const 0))
      (then (return (i64.const -1))))
    (if (i32.lt_s (call $gpu_sync) (i32.const 0)) (then (return (i64.const -1))))
    (i64.const 0))
)
