#pragma once
// The CUTLASS kernel behind concat_k_gemm: a persistent, warp-specialized
// cooperative Hopper GEMM (two consumer warpgroups on a 128x256x64 tile, a
// 2x1 cluster multicasting the shared operand) with the concatenated-K
// mainloop and a plain TMA-store epilogue (no source operand read).
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "lora/sm90/concat_k_gemm.h"
#include "lora/sm90/concat_k_mainloop.cuh"

namespace lrk::sm90 {

template <class T>
struct CutlassElement;
template <>
struct CutlassElement<at::BFloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CutlassElement<at::Half> {
  using type = cutlass::half_t;
};

using TileShape = Shape<_128, _256, _64>;

// The plain epilogue: D = acc (no source operand read).
template <class Element>
using PlainEpilogue = cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>;

// DoRA's epilogue: D = g[n] * acc + bias[n], and acc itself (y_unscaled, which
// the magnitude's gradient needs) stored from registers as an auxiliary output.
// A null bias pointer broadcasts 0.
template <class Element>
using DoraEpilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Element, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>, 4>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90AuxStore<0, void, Element, cutlass::FloatRoundStyle::round_to_nearest,
                                                cutlass::layout::RowMajor, void, void>,
        cutlass::epilogue::fusion::Sm90AccFetch>,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, float, Stride<_0, _1, int64_t>, 8>>;

template <class Element, FactorLayout kLayout, class Fusion = PlainEpilogue<Element>>
struct ConcatKGemmConfig {
  static constexpr int kAlign = 8;  // 16 bytes of bf16/fp16: TMA's unit
  using ClusterShape = Shape<_2, _1, _1>;
  using LayoutA = cutlass::layout::RowMajor;  // a [M, K]: K contiguous
  // CUTLASS's B is K x N: column-major means K contiguous (b [Nout, K] rows).
  using LayoutB = std::conditional_t<kLayout == FactorLayout::kOutputsByReduction, cutlass::layout::ColumnMajor,
                                     cutlass::layout::RowMajor>;
  using LayoutD = cutlass::layout::RowMajor;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, Element, LayoutD,
      kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = ConcatKMainloop<BaseMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Mainloop::StrideA;
  using StrideB = typename Mainloop::StrideB;
  using StrideD = typename Kernel::StrideD;

  static StrideA stride_a(int64_t pitch) { return StrideA{pitch, Int<1>{}, int64_t(0)}; }
  // b's pitch is its row stride in either layout.
  static StrideB stride_b(int64_t pitch) {
    if constexpr (kLayout == FactorLayout::kOutputsByReduction) {
      return StrideB{pitch, Int<1>{}, int64_t(0)};
    } else {
      return StrideB{Int<1>{}, pitch, int64_t(0)};
    }
  }
};

// Runs the configured kernel; `fusion` holds the epilogue's own arguments.
template <class Cfg, class T>
void launch_concat_k_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                          const at::Tensor& b2, at::Tensor& out, const typename Cfg::Epilogue::FusionCallbacks::Arguments& fusion) {
  using Element = typename CutlassElement<T>::type;
  using Gemm = typename Cfg::Gemm;

  const int M = static_cast<int>(a.size(0));
  const int K = static_cast<int>(a.size(1));
  const int N = static_cast<int>(out.size(1));
  const int K2 = static_cast<int>(k2);
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<Element const*>(t.data_ptr()); };

  typename Cfg::Mainloop::Arguments mainloop{ptr(a),  Cfg::stride_a(a.stride(0)),  ptr(b),  Cfg::stride_b(b.stride(0)),
                                             ptr(a2), Cfg::stride_a(a2.stride(0)), ptr(b2), Cfg::stride_b(b2.stride(0)),
                                             K,       K2};
  typename Cfg::StrideD stride_d{out.stride(0), Int<1>{}, int64_t(0)};
  typename Cfg::Epilogue::Arguments epilogue{fusion, nullptr, stride_d, reinterpret_cast<Element*>(out.data_ptr()),
                                             stride_d};

  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = a.get_device();
  hw_info.sm_count = at::cuda::getDeviceProperties(hw_info.device_id)->multiProcessorCount;

  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {M, N, Cfg::Mainloop::total_k(K, K2), 1},
                                mainloop,
                                epilogue,
                                hw_info};
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "lrk concat_k_gemm: CUTLASS cannot run this problem (",
              cutlassGetStatusString(status), "), M=", M, " N=", N, " K=", K, " k2=", K2);
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, a.options().dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  status = gemm.initialize(args, workspace.data_ptr(), stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "lrk concat_k_gemm: initialize failed (",
              cutlassGetStatusString(status), ")");
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "lrk concat_k_gemm: launch failed (", cutlassGetStatusString(status),
              ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, FactorLayout kLayout>
void run_concat_k_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                       const at::Tensor& b2, at::Tensor& out) {
  using Cfg = ConcatKGemmConfig<typename CutlassElement<T>::type, kLayout>;
  typename Cfg::Epilogue::FusionCallbacks::Arguments fusion{};
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  launch_concat_k_gemm<Cfg, T>(a, b, a2, k2, b2, out, fusion);
}

template <class T>
void run_concat_k_gemm_dora(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                            const at::Tensor& b2, const at::Tensor& g, const at::Tensor* bias, at::Tensor& out,
                            at::Tensor& out_unscaled) {
  using Element = typename CutlassElement<T>::type;
  using Cfg = ConcatKGemmConfig<Element, FactorLayout::kOutputsByReduction, DoraEpilogue<Element>>;
  using RowStride = Stride<_0, _1, int64_t>;
  typename Cfg::Epilogue::FusionCallbacks::Arguments fusion{
      {g.data_ptr<float>(), 1.0f, RowStride{}},                                              // g[n]
      {{}, {reinterpret_cast<Element*>(out_unscaled.data_ptr()),
            typename Cfg::StrideD{out_unscaled.stride(0), Int<1>{}, int64_t(0)}}},         // y_unscaled = acc
      {bias != nullptr ? reinterpret_cast<Element const*>(bias->data_ptr()) : nullptr, Element(0), RowStride{}},
      {}};                                                                                   // g * acc + bias
  launch_concat_k_gemm<Cfg, T>(a, b, a2, k2, b2, out, fusion);
}

}  // namespace lrk::sm90
