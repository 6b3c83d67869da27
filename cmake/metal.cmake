# The Metal backend (macOS on Apple Silicon): ops_metal.m compiled into libqes, with the kernels
# built at run time from one source string: the shared block, noise and update headers, the
# per-thread functions (qes_metal_kernels.h) and the kernels (qes_metal.metal), their quoted
# #include lines dropped.  Elsewhere nothing is built; tests/test_metal_logic.py checks the
# per-thread functions as C and C++ against the golden vectors.
if(APPLE)
  option(QES_METAL "Build the Metal backend (macOS, Apple Silicon)" ON)
  if(QES_METAL)
    enable_language(OBJC)
    set(_qes_metal_parts native/include/qes_blocks.h native/include/qes_noise.h native/include/qes_perturb.h
        native/include/qes_update.h native/src/metal/qes_metal_kernels.h native/src/metal/qes_metal.metal)
    set(_qes_metal_src "")
    foreach(_part ${_qes_metal_parts})
      file(READ ${CMAKE_CURRENT_SOURCE_DIR}/${_part} _text)
      string(REGEX REPLACE "#include \"[^\"]*\"" "" _text "${_text}")
      string(APPEND _qes_metal_src "${_text}\n")
      set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${_part})
    endforeach()
    file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/qes_metal_source.metal "${_qes_metal_src}")
    file(READ ${CMAKE_CURRENT_BINARY_DIR}/qes_metal_source.metal _hex HEX)
    string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," _bytes "${_hex}")
    file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/qes_metal_source.h
         "static const char qes_metal_source[] = {${_bytes} 0x00};\n")
    target_sources(qes PRIVATE native/src/metal/ops_metal.m)
    set_source_files_properties(native/src/metal/ops_metal.m PROPERTIES COMPILE_OPTIONS "-fobjc-arc")
    target_include_directories(qes PRIVATE ${CMAKE_CURRENT_BINARY_DIR} native/src/metal)
    target_compile_definitions(qes PRIVATE QES_HAVE_METAL=1)
    target_link_libraries(qes PRIVATE "-framework Metal" "-framework Foundation")
    list(APPEND QES_BACKENDS "metal")
  endif()
endif()
