# CUDA for the kernels: Ampere, Ada and Hopper as machine code, plus PTX for later GPUs (a
# -DCMAKE_CUDA_ARCHITECTURES=... on the command line wins). Included by both CMakeLists.txt.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES 80-real 86-real 89-real 90-real 90-virtual)
endif()
enable_language(CUDA)
find_package(CUDAToolkit)  # callers check for CUDA::cudart_static
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
