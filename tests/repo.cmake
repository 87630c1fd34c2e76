# Checks of the repository itself rather than of the library's behaviour.
add_test(NAME repo_licence
  COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR} -P ${CMAKE_CURRENT_SOURCE_DIR}/repo/licence.cmake)
