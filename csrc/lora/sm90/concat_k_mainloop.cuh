#pragma once
// A Hopper GEMM mainloop over a concatenated reduction dimension,
//
//     D = [A | A2] @ [B | B2]^T        A [M, K], A2 [M, K2], B [N, K], B2 [N, K2]
//
// that never materialises the concatenation: the producer warp fills the first
// ceil(K / BLK_K) pipeline stages from (A, B) and the next ceil(K2 / BLK_K) from
// (A2, B2), each pair through its own TMA descriptors. TMA zero-fills whatever
// a box reads past a tensor's extent, so both tails need no special case (and
// the rows of A2 may be padded past K2 for alignment). The consumer warpgroups
// run CUTLASS's own warp-specialized mainloop unchanged: they only see stages.
//
// LoRA folds its low-rank term into the frozen layer's GEMM this way, reading
// x, W and dy exactly as often as the frozen layer does:
//     y  = [x | h] @ [W | s*B]^T          dx = [dy | dh] @ [W ; A]
//
// The problem shape handed to the kernel carries the concatenated K as
// K_total = k_tiles_main * BLK_K + K2, so that the kernel's k-tile count,
// ceil(K_total / BLK_K), covers both parts exactly.
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/collective_builder.hpp>

namespace lrk::sm90 {

using namespace cute;

template <class Base>
struct ConcatKMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TileShape;
  using typename Base::DispatchPolicy;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using BaseParams = typename Base::Params;

  static constexpr int kBlockK = size<2>(TileShape{});

  struct Arguments {
    ElementA const* ptr_A;
    StrideA dA;
    ElementB const* ptr_B;
    StrideB dB;
    ElementA const* ptr_A2;
    StrideA dA2;
    ElementB const* ptr_B2;
    StrideB dB2;
    int k_main;   // K, the reduction extent of (A, B)
    int k_extra;  // K2, the reduction extent of (A2, B2)
  };

  // The base's descriptors and transaction sizes, plus the second pair: both
  // pairs fill identical shared-memory stages, so one TMA type serves each side.
  struct Params : BaseParams {
    typename BaseParams::TMA_A tma_load_a2;
    typename BaseParams::TMA_B tma_load_b2;
    int k_extra;
    int k_tiles_main;
  };

  static int total_k(int k_main, int k_extra) {
    return (k_main + kBlockK - 1) / kBlockK * kBlockK + k_extra;
  }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                        void* workspace) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    (void)K;
    typename Base::Arguments main_args{args.ptr_A, args.dA, args.ptr_B, args.dB};
    // The base builds (A, B)'s descriptors and the per-stage transaction bytes
    // from a problem whose K is the main part alone.
    BaseParams base = Base::to_underlying_arguments(make_shape(M, N, args.k_main, L), main_args, workspace);

    Tensor tensor_a2 = make_tensor(reinterpret_cast<InternalElementA const*>(args.ptr_A2),
                                   make_layout(make_shape(M, args.k_extra, L), args.dA2));
    Tensor tensor_b2 = make_tensor(reinterpret_cast<InternalElementB const*>(args.ptr_B2),
                                   make_layout(make_shape(N, args.k_extra, L), args.dB2));
    auto tma_a2 = make_tma_copy_A_sm90(GmemTiledCopyA{}, tensor_a2, SmemLayoutA{}(_, _, Int<0>{}), TileShape{},
                                       typename DispatchPolicy::ClusterShape{});
    auto tma_b2 = make_tma_copy_B_sm90(GmemTiledCopyB{}, tensor_b2, SmemLayoutB{}(_, _, Int<0>{}), TileShape{},
                                       typename DispatchPolicy::ClusterShape{});
    return Params{base, tma_a2, tma_b2, args.k_extra, (args.k_main + kBlockK - 1) / kBlockK};
  }

  // TMA needs 16-byte aligned base addresses and row pitches; the extents
  // themselves may be anything (the caller checks the rest, see concat_k_gemm).
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    auto aligned = [](void const* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    return M > 0 && N > 0 && args.k_main > 0 && args.k_extra > 0 && K == total_k(args.k_main, args.k_extra) &&
           L == 1 && aligned(args.ptr_A) && aligned(args.ptr_B) && aligned(args.ptr_A2) && aligned(args.ptr_B2);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_a2.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_b2.get_tma_descriptor());
  }

  // The first two tensors tile the concatenated K (the kernel sizes its k loop
  // and its output tiles from them); the last two tile (A2, B2) alone.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = Underscore;
    auto [M, N, K, L] = problem_shape_MNKL;
    Tensor mA_mkl = params.tma_load_a.get_tma_tensor(make_shape(M, K, L));
    Tensor mB_nkl = params.tma_load_b.get_tma_tensor(make_shape(N, K, L));
    Tensor mA2_mkl = params.tma_load_a2.get_tma_tensor(make_shape(M, params.k_extra, L));
    Tensor mB2_nkl = params.tma_load_b2.get_tma_tensor(make_shape(N, params.k_extra, L));
    Tensor gA_mkl = local_tile(mA_mkl, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{});
    Tensor gB_nkl = local_tile(mB_nkl, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});
    Tensor gA2_mkl = local_tile(mA2_mkl, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{});
    Tensor gB2_nkl = local_tile(mB2_nkl, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});
    return cute::make_tuple(gA_mkl, gB_nkl, gA2_mkl, gB2_nkl);
  }

  // Producer: the base's loop, except that a k-tile past the main part comes
  // from the second descriptor pair at (k - k_tiles_main).
  template <class TensorA, class TensorB, class TensorA2, class TensorB2, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorA2, TensorB2> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int /*thread_idx*/, uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;

    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

    using ClusterShape = typename DispatchPolicy::ClusterShape;
    constexpr uint32_t cluster_shape_x = get<0>(ClusterShape{});
    const uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x,
                                          block_rank_in_cluster / cluster_shape_x};
    auto block_tma_a = params.tma_load_a.get_slice(cluster_local_block_id.y);
    auto block_tma_b = params.tma_load_b.get_slice(cluster_local_block_id.x);
    auto block_tma_a2 = params.tma_load_a2.get_slice(cluster_local_block_id.y);
    auto block_tma_b2 = params.tma_load_b2.get_slice(cluster_local_block_id.x);

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = block_tma_a.partition_S(get<0>(load_inputs)(_, _, m_coord, _, l_coord));  // (TMA,TMA_M,TMA_K,k)
    Tensor tBgB = block_tma_b.partition_S(get<1>(load_inputs)(_, _, n_coord, _, l_coord));  // (TMA,TMA_N,TMA_K,k)
    Tensor tAgA2 = block_tma_a2.partition_S(get<2>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tBgB2 = block_tma_b2.partition_S(get<3>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tAsA = block_tma_a.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE)
    Tensor tBsB = block_tma_b.partition_D(sB);
    Tensor tAsA2 = block_tma_a2.partition_D(sA);
    Tensor tBsB2 = block_tma_b2.partition_D(sB);

    // Multicast masks as in CUTLASS's mainloop: A is shared along the cluster's
    // N extent, B along its M extent; both descriptor pairs use the same masks.
    uint16_t mcast_mask_a = 0;
    uint16_t mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};
      for (int n = 0; n < size<1>(block_layout); ++n) {
        mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x, n, Int<0>{}));
      }
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m) {
        mcast_mask_b |= (uint16_t(1) << block_layout(m, cluster_local_block_id.y, Int<0>{}));
      }
    }

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      using BarrierType = typename MainloopPipeline::ProducerBarrierType;
      BarrierType* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int k_tile = *k_tile_iter;
      if (k_tile < params.k_tiles_main) {
        copy(params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, k_tile), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, k_tile), tBsB(_, _, _, stage));
      } else {
        const int k2 = k_tile - params.k_tiles_main;
        copy(params.tma_load_a2.with(*tma_barrier, mcast_mask_a), tAgA2(_, _, _, k2), tAsA2(_, _, _, stage));
        copy(params.tma_load_b2.with(*tma_barrier, mcast_mask_b), tBgB2(_, _, _, k2), tBsB2(_, _, _, stage));
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace lrk::sm90
