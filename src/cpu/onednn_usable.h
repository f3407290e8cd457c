// Whether oneDNN may be called in this process, without oneDNN's headers: the files that
// only choose between oneDNN and our kernels include this (the standalone CUDA build
// compiles them where oneDNN is absent).
#pragma once

namespace tensorslim {
namespace cpu {

// False in a process forked after oneDNN started (the runtime threads its stream waits on
// were not copied by fork(), so a oneDNN call there would never return), and where oneDNN
// cannot create its CPU engine (its SYCL runtime finds no device). Every oneDNN-backed
// path checks this first and lets our own kernels run instead.
bool onednn_usable();

}  // namespace cpu
}  // namespace tensorslim
