# CMake generated Testfile for 
# Source directory: /work/main
# Build directory: /work/main/build/cpp
# 
# This file includes the relevant testing commands required for 
# testing this directory and lists subdirectories to be tested as well.
add_test(test_kernels "/work/main/build/cpp/test_kernels")
set_tests_properties(test_kernels PROPERTIES  _BACKTRACE_TRIPLES "/work/main/CMakeLists.txt;76;add_test;/work/main/CMakeLists.txt;0;")
